"""Policies that freeze rows (output channels): signed, enforced in full and LoRA fine-tuning,
guarded, and audited row by row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from guardtune.cli import app
from guardtune.contract import LORA_FILE
from guardtune.digits.dataset import export_digits
from guardtune.enforce.freeze import RowHold, freeze_for_training, frozen_unet_rows
from guardtune.enforce.guard import FrozenDigests
from guardtune.errors import IntegrityError, PolicyError
from guardtune.resolve import ModelSource
from guardtune.rowranges import problem, ranges_of
from guardtune.training.config import TrainConfig
from guardtune.training.finetune import finetune
from guardtune.trust.build import build_policy, sign_policy_file
from guardtune.trust.fingerprint import model_tensors
from guardtune.trust.policy import FreezePolicy, Provenance, json_schema
from guardtune.trust.signing import generate_key, public_pem
from guardtune.trust.verify import verify_policy
from tests.conftest import combined_output
from tests.policy_helpers import FROZEN, copy_model, edit_payload, write_signed

TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
ROWS = {
    f"unet.{TO_Q}.weight": ((0, 3), (7, 9)),
    "unet.conv_out.weight": ((1, 3),),
    "unet.conv_out.bias": ((0, 1),),
    "unet.time_embedding.linear_1.weight": ((0, 5), (10, 12)),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An fp32 model copy with a signed rows policy, and a full and a LoRA fine-tune of it."""
    root = tmp_path_factory.mktemp("rows")
    model = copy_model(root)
    unet_file = model / "unet" / "diffusion_pytorch_model.safetensors"
    state = {k: v.float() for k, v in load_file(str(unet_file)).items()}
    save_file(state, str(unet_file))
    key = generate_key()
    pub = root / "publisher.pub"
    pub.write_bytes(public_pem(key.public_key()))
    policy = build_policy(ModelSource("folder", model), FROZEN, Provenance("manual"), None, ROWS)
    sign_policy_file(policy, [key], model / "guardtune-policy.json")
    data = export_digits(root / "data", (7,), "train").out
    common = dict(model=str(model), trusted=(pub,), compare=False, show_progress=False)
    # A large learning rate and AdamW's weight decay: every trainable value moves.
    full = TrainConfig(steps=3, batch_size=4, lr=1e-2, adam_weight_decay=0.1)
    finetune(data, root / "full", config=full, **common)
    lora = TrainConfig(steps=3, batch_size=4, lora=True, rank=4, lr=1e-2, adam_weight_decay=0.1)
    finetune(data, root / "lora", config=lora, **common)
    return {"root": root, "model": model, "pub": pub, "key": key, "policy": policy,
            "base": state}  # fmt: skip


def _audit(setup, derivative):
    json_path = derivative.parent / f"{derivative.name}.audit.json"
    args = ["audit", str(derivative), "--base", str(setup["model"]), "--trusted", str(setup["pub"])]
    result = CliRunner().invoke(app, [*args, "--json", str(json_path)])
    return result, json.loads(json_path.read_text())


def _frozen_rows(tensor: torch.Tensor, ranges) -> torch.Tensor:
    return torch.cat([tensor[start:stop] for start, stop in ranges])


# ----------------------------------------------------------------------------- the policy


def test_row_ranges_have_one_spelling():
    assert ranges_of([9, 1, 2, 3, 7, 2]) == ((1, 4), (7, 8), (9, 10))
    assert problem([[0, 2], [2, 4]]) == "ranges must be sorted, disjoint and not touching"
    assert problem([[3, 5]], height=4) == "range [3, 5) passes the tensor's 4 rows"
    assert problem([[0, True]]) == "each range must be two integers [start, stop)"
    assert problem([]) == "no rows are listed"
    assert problem([[0, 2], [3, 4]], height=4) is None


def test_a_rows_policy_is_schema_3_and_round_trips(setup):
    policy = setup["policy"]
    assert policy.schema_version == 3
    assert policy.frozen_tensors == tuple(sorted(FROZEN))
    assert {n: r.ranges for n, r in policy.frozen_rows.items()} == ROWS
    data = policy.to_json()
    assert FreezePolicy.from_json(data) == policy and FreezePolicy.from_json(data).to_json() == data
    jsonschema.validate(json.loads(data), json_schema(3))
    # The share counts frozen rows as their part of the tensor.
    numel = {r.name: r.numel for r in model_tensors(ModelSource("folder", setup["model"]),
                                                   ("unet",))["unet"]}  # fmt: skip
    heights = {n: setup["base"][n.removeprefix("unet.")].shape[0] for n in ROWS}
    frozen = sum(numel[n] for n in FROZEN)
    frozen += sum(numel[n] * sum(b - a for a, b in r) / heights[n] for n, r in ROWS.items())
    assert policy.frozen_share.parameters == pytest.approx(frozen / sum(numel.values()), abs=1e-6)


@pytest.mark.parametrize(
    "rows, message",
    [
        ({"height": 320, "ranges": [[0, 4], [2, 6]], "digest": "0" * 64},
         "ranges must be sorted, disjoint and not touching"),
        ({"height": 320, "ranges": [[318, 321]], "digest": "0" * 64}, "passes the tensor's 320"),
        ({"height": 320, "ranges": [[0, 320]], "digest": "0" * 64}, "covers every row"),
        ({"height": 320, "ranges": [[0, 1]], "digest": "xyz"}, "sha256 hex digest"),
        ({"height": 320, "ranges": [[0, 1]]}, "is missing field 'digest'"),
    ],
)  # fmt: skip
def test_malformed_rows_are_policy_errors(setup, rows, message):
    raw = setup["policy"].to_dict()
    raw["frozen_rows"][f"unet.{TO_Q}.weight"] = rows
    with pytest.raises(PolicyError, match=message):
        FreezePolicy.from_json(json.dumps(raw))


def test_rows_of_a_whole_frozen_or_unknown_tensor_are_refused(setup):
    raw = setup["policy"].to_dict()
    entry = raw["frozen_rows"][f"unet.{TO_Q}.weight"]
    both = raw | {"frozen_rows": {FROZEN[0]: entry}}
    with pytest.raises(PolicyError, match="is frozen whole and in part"):
        FreezePolicy.from_json(json.dumps(both))
    unknown = raw | {"frozen_rows": {"unet.nowhere.weight": entry}}
    with pytest.raises(PolicyError, match="the model fingerprint lacks"):
        FreezePolicy.from_json(json.dumps(unknown))


def test_a_signed_row_digest_that_is_not_the_models_does_not_verify(setup, tmp_path):
    raw = setup["policy"].to_dict()
    raw["frozen_rows"][f"unet.{TO_Q}.weight"]["digest"] = "0" * 64
    path = write_signed(tmp_path / "policy.json", edit_payload(setup["policy"], **raw),
                        setup["key"])  # fmt: skip
    with pytest.raises(PolicyError, match=f"freezes rows of unet.{TO_Q}.weight that are not"):
        verify_policy(ModelSource("folder", setup["model"]), path, (setup["pub"],), False)
    verified = verify_policy(ModelSource("folder", setup["model"]), None, (setup["pub"],), False)
    assert verified.summary().tensors_in_part == len(ROWS)


def test_rows_covering_a_whole_tensor_freeze_it_whole(setup):
    height = setup["base"]["conv_out.bias"].shape[0]
    policy = build_policy(ModelSource("folder", setup["model"]), FROZEN, Provenance("manual"),
                          None, {"unet.conv_out.bias": ((0, height),)})  # fmt: skip
    assert "unet.conv_out.bias" in policy.frozen_tensors and not policy.frozen_rows
    assert policy.schema_version == 2  # a per-tensor policy: older readers still read it


# ----------------------------------------------------------------------------- enforcement


def test_the_hold_keeps_frozen_rows_through_adamw_weight_decay():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 8)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    hold = RowHold(dict(layer.named_parameters()), {"weight": ((1, 3),), "bias": ((0, 1), (5, 8))})
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(3):
        layer(torch.randn(4, 6)).square().sum().backward()
        hold.before_step()
        assert layer.weight.grad[1:3].count_nonzero() == 0
        optimizer.step()
        hold.after_step()
        optimizer.zero_grad()
    assert torch.equal(layer.weight[1:3], before["weight"][1:3])
    assert torch.equal(layer.bias[5:8], before["bias"][5:8])
    assert not torch.equal(layer.weight[3:], before["weight"][3:])  # the rest trained


def test_a_full_finetune_leaves_frozen_rows_bit_identical_and_trains_the_rest(setup):
    out = load_file(str(setup["root"] / "full" / "model" / "unet" /
                        "diffusion_pytorch_model.safetensors"))  # fmt: skip
    for name, ranges in ROWS.items():
        local = name.removeprefix("unet.")
        assert torch.equal(
            _frozen_rows(out[local], ranges), _frozen_rows(setup["base"][local], ranges)
        ), name
    weight = f"{TO_Q}.weight"
    assert not torch.equal(out[weight][3:7], setup["base"][weight][3:7])  # unfrozen rows moved
    result, report = _audit(setup, setup["root"] / "full")
    assert result.exit_code == 0, combined_output(result)
    assert report["counts"]["identical (frozen rows)"] == len(ROWS)
    assert report["counts"]["tensors frozen in part"] == len(ROWS)


def test_audit_catches_a_change_in_one_frozen_row_and_allows_other_rows(setup, tmp_path):
    weight = f"{TO_Q}.weight"

    def edited(row: int) -> Path:
        derivative = tmp_path / f"row{row}"
        shutil.copytree(setup["model"], derivative)
        target = derivative / "unet" / "diffusion_pytorch_model.safetensors"
        state = load_file(str(target))
        state[weight][row, 0] += 1e-3
        save_file(state, str(target))
        return derivative

    result, report = _audit(setup, edited(8))
    assert result.exit_code == 7
    (finding,) = report["violations"]
    assert finding["tensor"] == f"unet.{weight}" and finding["problem"] == "changed"
    assert finding["detail"].startswith("frozen rows: 1 of ")
    result, report = _audit(setup, edited(5))  # row 5 is not frozen
    assert result.exit_code == 0, combined_output(result)


def test_a_lora_finetune_holds_the_adapters_frozen_output_rows_at_zero(setup, tmp_path):
    lora_file = setup["root"] / "lora" / LORA_FILE
    adapters = load_file(str(lora_file))
    (up,) = [k for k in adapters if TO_Q in k and ("lora_B" in k or "lora.up" in k)]
    ranges = ROWS[f"unet.{TO_Q}.weight"]
    assert _frozen_rows(adapters[up], ranges).count_nonzero() == 0
    assert adapters[up][3:7].count_nonzero() > 0  # the adapter learned on the other rows
    result, report = _audit(setup, lora_file)
    assert result.exit_code == 0, combined_output(result)
    assert report["counts"]["adapter tensors clear of frozen rows"] >= 1

    adapters[up][1, 0] = 0.5  # one value on a frozen row
    touched = tmp_path / "touched.safetensors"
    save_file(adapters, str(touched))
    result, report = _audit(setup, touched)
    assert result.exit_code == 7
    (finding,) = [v for v in report["violations"] if v["problem"] == "lora-on-frozen-rows"]
    assert finding["tensor"] == f"unet.{TO_Q}.weight"
    assert "1 of its 5 frozen rows" in finding["detail"]


def test_an_adapter_that_reaches_every_row_is_a_violation_on_a_row_frozen_module(setup, tmp_path):
    adapters = load_file(str(setup["root"] / "lora" / LORA_FILE))
    (up,) = [k for k in adapters if TO_Q in k and ("lora_B" in k or "lora.up" in k)]
    magnitude = up.split(TO_Q)[0] + TO_Q + ".lora_magnitude_vector"
    adapters[magnitude] = torch.ones(adapters[up].shape[0])
    dora = tmp_path / "dora.safetensors"
    save_file(adapters, str(dora))
    result, report = _audit(setup, dora)
    assert result.exit_code == 7
    assert {v["problem"] for v in report["violations"]} == {"lora-on-frozen-rows"}


def test_the_guard_checks_frozen_rows_and_lora_output_rows(setup):
    from diffusers import UNet2DConditionModel

    policy = setup["policy"]
    source = ModelSource("folder", setup["model"])
    records = {r.name: r for r in model_tensors(source, ("unet",))["unet"]}
    guard = FrozenDigests.from_policy(policy.frozen_tensors, policy.model["unet"].tensors,
                                      records, policy.frozen_rows)  # fmt: skip
    unet = UNet2DConditionModel.from_pretrained(setup["model"] / "unet")
    assert guard.check(unet) == len(FROZEN) + len(ROWS)
    weight = dict(unet.named_parameters())[f"{TO_Q}.weight"]
    with torch.no_grad():
        weight[4, 0] += 1.0  # an unfrozen row
    assert guard.check(unet) == len(FROZEN) + len(ROWS)
    with torch.no_grad():
        weight[7, 0] += 1.0  # a frozen one
    with pytest.raises(IntegrityError, match=f"frozen rows of unet.{TO_Q}.weight changed"):
        guard.check(unet)


def test_freezing_counts_held_rows_and_refuses_rows_past_the_tensor(setup):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(setup["model"] / "unet")
    rows = frozen_unet_rows(setup["policy"])
    summary, hold = freeze_for_training(unet, set(), rows=rows)
    parameters = dict(unet.named_parameters())
    assert all(parameters[n].requires_grad for n in rows)  # frozen in part: still trained
    assert (
        summary.frozen_params
        == hold.parameters
        == sum(parameters[n][a:b].numel() for n, r in rows.items() for a, b in r)
    )
    with pytest.raises(PolicyError, match="past its 4 rows"):
        freeze_for_training(unet, set(), rows={"conv_out.bias": ((2, 6),)})


def test_adapters_reaching_frozen_rows_through_non_finite_values_or_a_bias_are_violations(
    setup, tmp_path
):
    adapters = load_file(str(setup["root"] / "lora" / LORA_FILE))
    (up,) = [k for k in adapters if TO_Q in k and ("lora_B" in k or "lora.up" in k)]
    (down,) = [k for k in adapters if TO_Q in k and ("lora_A" in k or "lora.down" in k)]
    stem = up[: up.index(TO_Q) + len(TO_Q)]
    frozen = [r for a, b in ROWS[f"unet.{TO_Q}.weight"] for r in range(a, b)]
    bias = torch.full((adapters[up].shape[0],), 0.5)

    def audited(name: str, edit) -> dict:
        edited = dict(adapters)
        edit(edited)
        path = tmp_path / f"{name}.safetensors"
        save_file(edited, str(path))
        result, report = _audit(setup, path)
        assert result.exit_code == 7, name
        return {v["tensor"]: v["problem"] for v in report["violations"]}

    # up is zero on the frozen rows, but 0 x inf is NaN: merged, the frozen rows become NaN.
    expected = {f"unet.{TO_Q}.weight": "lora-on-frozen-rows"}
    poisoned = adapters[down].clone()
    poisoned[0, 0] = float("inf")
    assert audited("down-inf", lambda d: d.update({down: poisoned})) == expected
    assert audited("alpha-nan", lambda d: d.update({f"{stem}.alpha": torch.tensor(float("nan"))}))
    # peft's lora_bias adds B's bias to every output row of a module the base gives no bias.
    assert audited("bias", lambda d: d.update({f"{stem}.lora_B.bias": bias})) == expected
    bias[frozen] = 0  # zero on the frozen rows: as clear of them as up itself
    clear = dict(adapters, **{f"{stem}.lora_B.bias": bias})
    save_file(clear, str(tmp_path / "clear.safetensors"))
    result, _ = _audit(setup, tmp_path / "clear.safetensors")
    assert result.exit_code == 0, combined_output(result)

"""Resolving a model folder into a manifest: exactly which files and bytes make up each part.

The trust chain fingerprints, and `models.load_pipeline` loads, what the manifest lists, and
nothing else: the one set of rules for which weight file, index, shard or variant of a
component counts. The rules follow diffusers' and transformers' loaders where those are
unambiguous, and refuse (DataError, exit 3) every layout where loaders disagree or where
bytes could come from somewhere the manifest does not name:

- a component of model_index.json must have its own folder (diffusers falls back to the
  pipeline's root), of a class guardtune serves;
- weights are safetensors: a pickle file (`.bin`, `.ckpt`, `.pt`, `.pth`) or any other weight
  file the rules do not account for is refused, never skipped;
- a folder holding both a single weight file and a sharded index is refused (diffusers loads
  the index, transformers the single file);
- an index may name only files beside it; every tensor of a shard must be mapped to that shard
  and no tensor may sit in two files;
- weight files of another variant (`*.fp16.safetensors` when no variant is asked for) are
  accounted for and listed, not loaded;
- code (`*.py`), adapters (`adapter_config.json`), quantisation or weight redirects in a
  config, and tokenizer redirects (`fast_tokenizer_files`, `tokenizer.model`) are refused;
- a symbolic link counts only if it resolves inside the model's folder, and every file must
  be a regular file (a FIFO is never opened).
Called by `models` (loading), `trust.fingerprint` (binding) and the audit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from guardtune.contract import ASSETS_DIR, regular_file_inside
from guardtune.errors import DataError
from guardtune.tensorfile import TensorRecord, read_header, renamed

EMBEDDED = "digits"
EMBEDDED_DIR = ASSETS_DIR / "digits"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `kind` is 'embedded', 'folder' or 'single_file'.

    `variant` picks weight files saved with `variant=` (e.g. "fp16"); `root` is the folder
    that links may point into (the model's own folder, or a hub repository's cache folder,
    whose snapshots link into its blobs); `name` labels a hub model ("org/name@commit").
    """

    kind: str
    path: Path
    config_dir: Path | None = None
    variant: str | None = None
    root: Path | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return EMBEDDED if self.kind == "embedded" else str(self.path)


def resolve_model(
    model: str | ModelSource,
    config_dir: Path | None = None,
    *,
    revision: str | None = None,
    variant: str | None = None,
) -> ModelSource:
    """Turn a `--model` into a checked ModelSource; DataError if it cannot be one.

    `model` is 'digits', a local diffusers folder, a single `.safetensors` file (with
    `config_dir`), or a Hugging Face hub id ("org/name") already in the local cache, at
    `revision` (a branch, tag or commit; "main" by default). Nothing is ever downloaded.
    """
    if isinstance(model, ModelSource):
        return model
    if variant is not None and not re.fullmatch(r"\w+", variant):
        raise DataError(f"--variant {variant!r} must be a word such as fp16")
    path = Path(model).expanduser()
    if revision is not None and (model == EMBEDDED or path.exists()):
        raise DataError("--revision applies to hub ids only, not to local files")
    if model == EMBEDDED:
        if not (EMBEDDED_DIR / "model_index.json").is_file():
            raise DataError(
                "the embedded model's weights are missing from the package",
                hint="reinstall guardtune or run `make embedded`",
            )
        return ModelSource("embedded", EMBEDDED_DIR, variant=variant)
    if not path.exists() and _HUB_ID.fullmatch(model):
        return _from_hub_cache(model, revision, variant)
    if not path.exists():
        raise DataError(
            f"model {model!r} not found",
            hint="give 'digits', a diffusers folder, a hub id in the local cache, or a "
            ".safetensors file with --model-config",
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise DataError(
                f"{path} is not a diffusers pipeline folder: it has no model_index.json",
                hint="point --model at the folder that save_pretrained wrote",
            )
        return ModelSource("folder", path, variant=variant)
    if path.suffix != ".safetensors":
        raise DataError(f"{path} is not a .safetensors checkpoint", hint="convert it first")
    if config_dir is None:
        raise DataError(
            f"the single-file checkpoint {path.name} needs its component configs",
            hint="pass --model-config with a diffusers folder of the same architecture",
        )
    if not (config_dir / "model_index.json").is_file():
        raise DataError(f"--model-config {config_dir} has no model_index.json")
    return ModelSource("single_file", path, config_dir)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_REVISION = re.compile(r"[\w.-]+(/[\w.-]+)*")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_cache() -> Path:
    """The local Hugging Face hub cache, located as huggingface_hub locates it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    default_home = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface"
    return Path(os.environ.get("HF_HOME", default_home)).expanduser() / "hub"


def _from_hub_cache(repo_id: str, revision: str | None, variant: str | None) -> ModelSource:
    """A hub id's snapshot folder in the local cache: refs/<revision> -> snapshots/<commit>."""
    cache = hub_cache()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    if not repo.is_dir():
        raise DataError(
            f"{repo_id} is not in the local Hugging Face cache ({cache})",
            hint="download it with your usual tools first: guardtune never downloads",
        )
    revision = revision or "main"
    if not _REVISION.fullmatch(revision) or ".." in revision.split("/"):
        raise DataError(f"--revision {revision!r} is not a branch, tag or commit name")
    commit = revision
    if not _COMMIT.fullmatch(revision):
        ref = repo / "refs" / revision
        if not ref.is_file() or ref.is_symlink():
            raise DataError(f"{repo_id} has no revision {revision!r} in the local cache")
        with ref.open("rb") as handle:  # a ref is one line; read no more than that
            commit = handle.read(128).decode(errors="replace").strip()
        if not _COMMIT.fullmatch(commit):
            raise DataError(f"{ref} does not hold a commit hash")
    snapshot = repo / "snapshots" / commit
    if not (snapshot / "model_index.json").is_file():
        raise DataError(
            f"{repo_id} at {commit[:12]} has no complete snapshot with model_index.json"
        )
    name = f"{repo_id}@{commit}"
    return ModelSource("folder", snapshot, variant=variant, root=repo, name=name)


# Pipelines guardtune loads, with the components it loads for each (others are not read).
PIPELINES = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "StableDiffusionXLPipeline": (
        "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
    ),
}  # fmt: skip
TOKENIZERS = ("tokenizer", "tokenizer_2")
# What each component may be; the loader builds exactly these classes.
CLASSES = {
    "unet": ("diffusers", ("UNet2DConditionModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "text_encoder": ("transformers", ("CLIPTextModel",)),
    # SDXL's second encoder: OpenCLIP bigG, whose pooled and projected output conditions the UNet.
    "text_encoder_2": ("transformers", ("CLIPTextModelWithProjection",)),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "tokenizer_2": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
}
# The name stem of the weight files, per library.
WEIGHT_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
WEIGHT_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors", ".gguf", ".msgpack", ".h5", ".onnx")
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
)  # fmt: skip
TOKENIZER_REDIRECTS = ("tokenizer.model", "tekken.json", "tiktoken.model")
CONFIG_REDIRECTS = ("quantization_config", "transformers_weights")
_SHARD = r"-\d{5}-of-\d{5}"


@dataclass(frozen=True)
class ConfigFile:
    """A configuration file as read once: its bytes are what the loader parses."""

    name: str  # relative to the model folder, e.g. "unet/config.json"
    sha256: str
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class ComponentManifest:
    name: str
    library: str
    class_name: str
    configs: tuple[ConfigFile, ...]
    tensors: tuple[TensorRecord, ...] = ()  # names prefixed with the component ("unet.")
    weight_files: tuple[Path, ...] = ()

    def config(self, name: str) -> dict:
        """A config file of this component, parsed."""
        for config in self.configs:
            if config.name.endswith("/" + name):
                return json.loads(config.data)
        raise KeyError(name)


@dataclass(frozen=True)
class Manifest:
    """Everything a folder contributes to the loaded pipeline, and what it holds besides."""

    root: Path
    pipeline_class: str
    variant: str | None
    index: ConfigFile  # model_index.json
    components: dict[str, ComponentManifest]
    other_variants: tuple[str, ...] = ()  # weight files of other variants, not loaded

    @property
    def weighted(self) -> tuple[str, ...]:
        """The components that hold weights, in the pipeline's order."""
        return tuple(name for name, part in self.components.items() if part.weight_files)

    def config_digests(self) -> dict[str, str]:
        """sha256 of every configuration file the loader parses, by its name in the folder."""
        files = [self.index, *(c for part in self.components.values() for c in part.configs)]
        return {config.name: config.sha256 for config in sorted(files, key=lambda c: c.name)}


def resolve_folder(
    root: Path, variant: str | None = None, allowed_root: Path | None = None
) -> Manifest:
    """The manifest of a diffusers pipeline folder; DataError (exit 3) on anything ambiguous.

    Links may point anywhere inside `allowed_root` (the folder itself by default).
    """
    root = Path(root)
    real_root = Path(allowed_root or root).resolve()
    _refuse_code(root)
    index = _read_config(root, real_root, "model_index.json")
    entries = _parse_json(index, "model_index.json")
    if not isinstance(entries, dict):
        raise DataError(f"{root}/model_index.json is not a JSON object")
    pipeline_class = entries.get("_class_name")
    if not isinstance(pipeline_class, str):
        raise DataError(f"{root}/model_index.json has no pipeline class name")
    if "transformer" in entries or pipeline_class not in PIPELINES:
        raise DataError(
            f"{root} holds a {pipeline_class}, which guardtune cannot serve",
            hint="guardtune serves the UNet pipelines of Stable Diffusion 1.x, 2.x and XL",
        )
    components: dict[str, ComponentManifest] = {}
    other_variants: list[str] = []
    for name in PIPELINES[pipeline_class]:
        spec = entries.get(name)
        if not (isinstance(spec, list) and len(spec) == 2):
            spec = [None, None]
        library, class_name = spec
        if not (isinstance(library, str) and isinstance(class_name, str)):
            raise DataError(f"{root}/model_index.json does not name a class for {name}")
        folder = root / name
        if not folder.is_dir() or folder.is_symlink():
            raise DataError(f"{root} has no {name}/ folder, which model_index.json lists")
        _refuse_code(folder)
        if name == "scheduler":
            if library != "diffusers" or not class_name.endswith("Scheduler"):
                raise DataError(f"{root}: scheduler class {library}.{class_name} is not served")
            configs = (_read_config(root, real_root, "scheduler/scheduler_config.json"),)
            components[name] = ComponentManifest(name, library, class_name, configs)
            continue
        allowed_library, allowed_classes = CLASSES[name]
        if library != allowed_library or class_name not in allowed_classes:
            raise DataError(
                f"{root}: {name} is a {library}.{class_name}; guardtune loads "
                f"{allowed_library}.{' or '.join(allowed_classes)} there"
            )
        if name in TOKENIZERS:
            components[name] = _tokenizer(root, real_root, name, class_name)
            continue
        config = _read_config(root, real_root, f"{name}/config.json")
        parsed = _parse_json(config, f"{name}/config.json")
        redirects = [k for k in CONFIG_REDIRECTS if isinstance(parsed, dict) and k in parsed]
        if not isinstance(parsed, dict) or redirects:
            detail = f"sets {redirects[0]}" if redirects else "is not a JSON object"
            raise DataError(f"{root}/{name}/config.json {detail}; guardtune refuses it")
        files, others = _weights(folder, real_root, WEIGHT_STEMS[library], library, variant)
        other_variants += [f"{name}/{other}" for other in others]
        tensors = _tensors(folder, name, files)
        component = ComponentManifest(name, library, class_name, (config,), tensors, files)
        components[name] = component
    return Manifest(root, pipeline_class, variant, index, components, tuple(other_variants))


# ----------------------------------------------------------------------------- files


def _inside(path: Path, real_root: Path) -> Path:
    """The regular file `path`, following a link only when it stays inside the model folder."""
    return regular_file_inside(
        path, real_root, "links outside the model folder; guardtune refuses it"
    )


def _read_config(root: Path, real_root: Path, name: str) -> ConfigFile:
    path = root / name
    if not path.exists():
        raise DataError(f"{root} has no {name}")
    data = _inside(path, real_root).read_bytes()
    return ConfigFile(name, hashlib.sha256(data).hexdigest(), data)


def _parse_json(config: ConfigFile, name: str):
    try:
        return json.loads(config.data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise DataError(f"{name} is not valid JSON ({error})") from None


def _refuse_code(folder: Path) -> None:
    """diffusers runs (or asks to run) Python files it finds in a pipeline or component folder."""
    code = sorted(folder.glob("*.py"))
    if code:
        raise DataError(f"{code[0]} is code inside a model folder; guardtune refuses it")
    for adapter in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        if (folder / adapter).exists():
            raise DataError(f"{folder / adapter}: an adapter inside a model folder is refused")


def _tokenizer(root: Path, real_root: Path, name: str, class_name: str) -> ComponentManifest:
    folder = root / name
    redirects = [name for name in TOKENIZER_REDIRECTS if (folder / name).exists()]
    if redirects:
        raise DataError(f"{folder / redirects[0]} would replace the tokenizer's vocabulary")
    names = [n for n in TOKENIZER_FILES if (folder / n).exists()]
    templates = sorted((folder / "additional_chat_templates").glob("*.jinja"))
    names += [f"additional_chat_templates/{t.name}" for t in templates]
    configs = tuple(_read_config(root, real_root, f"{name}/{n}") for n in names)
    for config in configs:
        if config.name.endswith("tokenizer_config.json"):
            parsed = _parse_json(config, config.name)
            if isinstance(parsed, dict) and "fast_tokenizer_files" in parsed:
                raise DataError(f"{root}/{config.name} redirects tokenizer.json; refused")
    if not any(c.name.endswith(("tokenizer.json", "vocab.json")) for c in configs):
        raise DataError(f"{folder} holds no tokenizer vocabulary")
    return ComponentManifest(name, "transformers", class_name, configs)


def _variant_of(name: str, stem: str) -> str | None:
    """The variant a weight file or index of `stem` belongs to ('' for none, None: not one)."""
    patterns = (
        rf"{stem}(?:{_SHARD})?\.safetensors",
        rf"{stem}\.safetensors\.index\.json",
        rf"{stem}\.(?P<v>\w+)(?:{_SHARD})?\.safetensors",
        rf"{stem}{_SHARD}\.(?P<v>\w+)\.safetensors",  # diffusers' legacy shard naming
        rf"{stem}\.safetensors\.index\.(?P<v>\w+)\.json",
        rf"{stem}\.(?P<v>\w+)\.safetensors\.index\.json",  # the legacy variant index
    )
    for pattern in patterns:
        match = re.fullmatch(pattern, name)
        if match:
            return match.groupdict().get("v") or ""
    return None


def _weights(
    folder: Path, real_root: Path, stem: str, library: str, variant: str | None
) -> tuple[tuple[Path, ...], list[str]]:
    """The weight files a component loads, and the other variants' files it holds."""
    # As diffusers does, a component without files of the variant loads its plain weights.
    names = [p.name for p in folder.iterdir()]
    if variant and not any(_variant_of(name, stem) == variant for name in names):
        variant = None
    suffix = f".{variant}" if variant else ""
    single = folder / f"{stem}{suffix}.safetensors"
    index = folder / (f"{stem}.safetensors.index{suffix}.json")
    entries = sorted(
        p
        for p in folder.iterdir()
        if p.name.endswith(WEIGHT_SUFFIXES) or (".index" in p.name and p.name.endswith(".json"))
    )
    pickles = [p for p in entries if p.name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise DataError(
            f"{pickles[0]} is a pickle weight file; guardtune reads safetensors only",
            hint="convert it, or remove it if a .safetensors copy is beside it",
        )
    if single.exists() and index.exists():
        raise DataError(
            f"{folder} holds both {single.name} and {index.name}; loaders disagree on which "
            f"counts ({'the index' if library == 'diffusers' else 'the single file'} for "
            f"{library}), so guardtune refuses the folder"
        )
    if index.exists():
        files = _shards(index, real_root)
    elif single.exists():
        _inside(single, real_root)
        files = (single,)
    else:
        found = [p.name for p in entries if p.name.endswith(".safetensors")]
        raise DataError(
            f"{folder} has no {single.name}" + (f" (it holds {', '.join(found)})" if found else ""),
            hint="pass the variant its files are saved in" if found else None,
        )
    loaded = {p.name for p in files} | {index.name}
    others = []
    for path in entries:
        if path.name in loaded:
            continue
        belongs = _variant_of(path.name, stem)
        if belongs is None or belongs == (variant or ""):
            raise DataError(
                f"{path} is a weight file the manifest cannot account for",
                hint="remove it: loaders may read it instead of or beside the weights",
            )
        others.append(path.name)
    return files, others


def _shards(index: Path, real_root: Path) -> tuple[Path, ...]:
    try:
        raw = json.loads(_inside(index, real_root).read_bytes())
        weight_map = raw["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError):
        raise DataError(f"{index} is not a valid sharded-weights index") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise DataError(f"{index} has no weight map")
    shards: set[str] = set()
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise DataError(f"{index} maps {tensor} to {shard!r}, which is not a file beside it")
        shards.add(shard)
    files = tuple(index.parent / shard for shard in sorted(shards))
    for path in files:
        if not path.exists():
            raise DataError(f"{index} names {path.name}, which is missing")
        _inside(path, real_root)
        mapped = {t for t, s in weight_map.items() if s == path.name}
        stored = {record.name for record in read_header(path)}
        if stored != mapped:
            odd = sorted(stored ^ mapped)[0]
            where = "is in the file but mapped elsewhere" if odd in stored else "is not in it"
            raise DataError(f"{path}: tensor {odd} {where} ({index.name})")
    return files


def weight_sets(folder: Path, component: str = "unet") -> dict[str, tuple[TensorRecord, ...]]:
    """Every set of weights a loader could read from a diffusers component folder, by variant
    ("" for the plain one; none if it holds no weights), each resolved by the rules above;
    DataError on anything else."""
    folder = Path(folder)
    stem = WEIGHT_STEMS["diffusers"]
    variants = sorted({v for p in folder.iterdir() if (v := _variant_of(p.name, stem)) is not None})
    real_root = folder.resolve()
    sets = {}
    for variant in variants:
        files, _ = _weights(folder, real_root, stem, "diffusers", variant or None)
        sets[variant] = _tensors(folder, component, files)
    return sets


def _tensors(folder: Path, component: str, files: tuple[Path, ...]) -> tuple[TensorRecord, ...]:
    records = [renamed(r, f"{component}.{r.name}") for path in files for r in read_header(path)]
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})[0]
        raise DataError(f"{folder}: tensor {twice} is stored in two files")
    return tuple(records)

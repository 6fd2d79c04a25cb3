import torch

from guardtune.learn.freezeasguard import _FlatDot, _ForeachAdam


def test_flat_dot_equals_per_tensor_inner_products():
    generator = torch.Generator().manual_seed(0)
    a = [torch.randn(shape, generator=generator) for shape in ((3, 4), (5,), (2, 2, 2))]
    b = [torch.randn(t.shape, generator=generator) for t in a]
    expected = torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)])
    assert torch.allclose(_FlatDot(a)([t.clone() for t in a], b), expected, atol=1e-6)


def test_foreach_adam_matches_torch_adam():
    generator = torch.Generator().manual_seed(1)
    reference = [torch.nn.Parameter(torch.randn(4, 3, generator=generator)) for _ in range(2)]
    ours = [p.detach().clone() for p in reference]
    optimizer = torch.optim.Adam(reference, lr=1e-2)
    adam = _ForeachAdam(ours, lr=1e-2)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=generator) for p in reference]
        for p, g in zip(reference, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        torch._foreach_sub_(ours, adam.update(grads))
    assert all(
        torch.allclose(p.detach(), q, atol=1e-6) for p, q in zip(reference, ours, strict=True)
    )

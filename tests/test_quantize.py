"""VectorQuantizer: lookup, straight-through gradient, loss placement, statistics, dead-code restart."""
import pytest
import torch

from ldm.modules.quantize import VectorQuantizer, perplexity


def quantizer(codes, **kw) -> VectorQuantizer:
    codes = torch.as_tensor(codes, dtype=torch.float32)
    vq = VectorQuantizer(codes.shape[0], codes.shape[1], **kw)
    with torch.no_grad():
        vq.embedding.weight.copy_(codes)
    return vq


def as_map(vectors) -> torch.Tensor:
    """(N, C) -> (1, C, 1, N) so the N vectors are the spatial positions of one image."""
    return torch.as_tensor(vectors, dtype=torch.float32).t()[None, :, None, :]


CODES = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]


def test_nearest_code_lookup_and_index_shapes():
    vq = quantizer(CODES).eval()
    z = as_map([[0.1, -0.1], [0.9, 0.2], [0.2, 0.8], [4.0, 4.5], [0.6, 0.1]])
    z_q, _, info = vq(z)
    assert info["indices"].tolist() == [0, 1, 2, 3, 1]
    assert torch.allclose(z_q, as_map([CODES[i] for i in [0, 1, 2, 3, 1]]))
    sane = quantizer(CODES, sane_index_shape=True).eval()
    assert sane(torch.zeros(2, 2, 3, 4))[2]["indices"].shape == (2, 3, 4)
    entries = vq.get_codebook_entry(info["indices"], (1, 1, 5, 2))
    assert torch.equal(entries, z_q)


def test_straight_through_gradient_reaches_encoder_unchanged():
    vq = quantizer(CODES).eval()
    z = as_map([[0.1, -0.1], [0.9, 0.2], [0.2, 0.8]]).requires_grad_(True)
    z_q, _, _ = vq(z)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)


@pytest.mark.parametrize("legacy", [True, False])
def test_loss_value_and_beta_placement(legacy):
    beta = 0.25
    vq = quantizer(CODES, beta=beta, legacy=legacy).eval()
    z = as_map([[0.2, 0.0], [1.0, 0.4]]).requires_grad_(True)   # nearest codes 0 and 1
    _, loss, _ = vq(z)
    e = as_map([CODES[0], CODES[1]])
    mse = ((z.detach() - e) ** 2).mean()
    assert loss.item() == pytest.approx((1 + beta) * mse.item())
    loss.backward()
    n = z.numel()
    commit_w, codebook_w = (1.0, beta) if legacy else (beta, 1.0)
    assert torch.allclose(z.grad, commit_w * 2 * (z.detach() - e) / n)
    grad_e = vq.embedding.weight.grad
    assert torch.allclose(grad_e[0], codebook_w * 2 * (torch.tensor(CODES[0]) - torch.tensor([0.2, 0.0])) / n)
    assert torch.allclose(grad_e[1], codebook_w * 2 * (torch.tensor(CODES[1]) - torch.tensor([1.0, 0.4])) / n)
    assert torch.equal(grad_e[2:], torch.zeros(2, 2))         # unused codes get no gradient


def test_codebook_moves_toward_assigned_encodings():
    vq = quantizer(CODES).eval()
    z = as_map([[0.4, 0.3], [0.3, 0.4]])
    opt = torch.optim.SGD(vq.parameters(), lr=1.0)
    before = (vq.embedding.weight[0] - z[0, :, 0].mean(1)).norm().item()
    for _ in range(5):
        opt.zero_grad()
        vq(z)[1].backward()
        opt.step()
    after = (vq.embedding.weight[0] - z[0, :, 0].mean(1)).norm().item()
    assert after < 0.5 * before
    assert torch.equal(vq.embedding.weight[1:], torch.tensor(CODES[1:]))


def test_perplexity_and_usage_hand_case():
    vq = quantizer(CODES).eval()
    _, _, info = vq(as_map([[0.0, 0.0], [0.1, 0.0], [1.0, 0.1], [0.9, 0.0]]))   # codes 0,0,1,1
    assert info["perplexity"].item() == pytest.approx(2.0)
    assert info["usage"].item() == pytest.approx(0.5)
    assert perplexity(torch.tensor([1, 1, 1, 1])).item() == pytest.approx(4.0)
    assert perplexity(torch.tensor([7, 0, 0])).item() == pytest.approx(1.0)


def test_dead_codes_restart_from_encoder_outputs():
    torch.manual_seed(0)
    vq = quantizer(CODES, restart_unused_after=3)
    z = as_map([[0.1, 0.0], [0.0, 0.1], [0.05, 0.05], [0.1, 0.1]])  # all nearest to code 0
    vq(z)
    vq(z)
    assert torch.equal(vq.embedding.weight, torch.tensor(CODES))
    assert vq.steps_unused.tolist() == [0, 2, 2, 2]
    vq(z)                                                         # third unused step: codes 1..3 restart
    w = vq.embedding.weight.detach()
    assert torch.equal(w[0], torch.tensor(CODES[0]))
    rows = z[0, :, 0].t()                                         # (4, 2) encoder outputs
    for k in (1, 2, 3):
        assert any(torch.equal(w[k], r) for r in rows), k
    assert len({tuple(w[k].tolist()) for k in (1, 2, 3)}) == 3    # distinct picks
    assert vq.steps_unused.tolist() == [0, 0, 0, 0]


def test_no_restart_in_eval_mode_or_when_disabled():
    z = as_map([[0.1, 0.0]])
    for vq in (quantizer(CODES, restart_unused_after=1).eval(), quantizer(CODES, restart_unused_after=None)):
        for _ in range(3):
            vq(z)
        assert torch.equal(vq.embedding.weight, torch.tensor(CODES))


def test_compvis_state_dict_without_usage_buffer_loads_strictly():
    vq = quantizer(CODES, restart_unused_after=5)
    vq(as_map([[0.1, 0.0]]))
    assert set(vq.state_dict()) == {"embedding.weight", "steps_unused"}
    fresh = VectorQuantizer(4, 2)
    fresh.load_state_dict({"embedding.weight": torch.tensor(CODES)}, strict=True)
    assert torch.equal(fresh.embedding.weight, torch.tensor(CODES))
    fresh.load_state_dict(vq.state_dict())
    assert fresh.steps_unused.tolist() == [0, 1, 1, 1]


def test_bad_input_errors():
    with pytest.raises(NotImplementedError, match="remap"):
        VectorQuantizer(4, 2, remap="used_codes.npy")
    with pytest.raises(ValueError, match="restart_unused_after"):
        VectorQuantizer(4, 2, restart_unused_after=0)
    with pytest.raises(ValueError, match="e_dim=2"):
        VectorQuantizer(4, 2)(torch.zeros(1, 3, 2, 2))


def _restart_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(rank)                                       # ranks draw different replacements
    vq = quantizer(CODES, restart_unused_after=2)
    # rank 0 uses codes 0, 1; rank 1 uses codes 0, 1, 2
    z = as_map([[0.1 * rank, 0.0], [1.0, 0.1 * rank], [0.2, 0.3 + rank]])
    for _ in range(2):
        vq(z)
    torch.save(vq.state_dict(), f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_restart_is_identical_across_ddp_ranks(tmp_path):
    torch.multiprocessing.spawn(_restart_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    sd0, sd1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(sd0["steps_unused"], sd1["steps_unused"])
    assert torch.equal(sd0["embedding.weight"], sd1["embedding.weight"])
    assert torch.equal(sd0["embedding.weight"][2], torch.tensor(CODES[2]))  # used on rank 1 only: kept
    # code 3 is used on neither rank, so it restarted (to one of rank 0's encoder outputs, broadcast)
    assert not torch.equal(sd0["embedding.weight"][3], torch.tensor(CODES[3]))
    rank0_rows = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.2, 0.3])]
    assert any(torch.equal(sd0["embedding.weight"][3], r) for r in rank0_rows)

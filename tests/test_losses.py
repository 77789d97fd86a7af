"""The shared losses: chunked == dense reference, padding ignored, 2 ranks == 1 rank."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from regionvlp.config import LossConfig
from regionvlp.losses import AlignmentLoss, region_word_scores
from regionvlp.outputs import TextOutput, VideoOutput


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------ dense reference
def dense_region_word(r, rm, t, tm, tau):
    """The formula of the paper, literally, over the whole batch at once.

    a_{n,l} = softmax over real words of <r_n, t_l> / tau; alpha_n = sum_l a_{n,l} t_l;
    S^{v->t}_ij = mean over real regions of <r_n, alpha_n>; and symmetrically t->v.
    Materialises [Bv, Bt, N, L] and [Bv, Bt, N, D] (tests only).
    """
    rm, tm = rm.bool(), tm.bool()
    r = torch.where(rm[..., None], r, torch.zeros_like(r))
    t = torch.where(tm[..., None], t, torch.zeros_like(t))
    s = torch.einsum("ind,jld->ijnl", r, t)  # [Bv, Bt, N, L]
    neg = torch.finfo(s.dtype).min
    a = torch.softmax((s / tau).masked_fill(~tm[None, :, None, :], neg), dim=3)  # over words
    alpha = torch.einsum("ijnl,jld->ijnd", a, t)  # [Bv, Bt, N, D]
    per_region = torch.einsum("ind,ijnd->ijn", r, alpha)
    s_vt = (per_region * rm[:, None, :]).sum(2) / rm.sum(1).clamp(min=1)[:, None]
    b = torch.softmax((s / tau).masked_fill(~rm[:, None, :, None], neg), dim=2)  # over regions
    beta = torch.einsum("ijnl,ind->ijld", b, r)  # [Bv, Bt, L, D]
    per_word = torch.einsum("jld,ijld->ijl", t, beta)
    s_tv = (per_word * tm[None, :, :]).sum(2) / tm.sum(1).clamp(min=1)[None, :]
    return s_vt, s_tv


def dense_loss(v_cls, t_cls, r, rm, t, tm, tau, tau_a, lam):
    labels = torch.arange(v_cls.shape[0])
    logits = v_cls @ t_cls.T / tau
    glob = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    s_vt, s_tv = dense_region_word(r, rm, t, tm, tau_a)
    local = 0.5 * (F.cross_entropy(s_vt / tau, labels) + F.cross_entropy(s_tv.T / tau, labels))
    return glob + lam * local, glob, local


def ragged_inputs(bv=7, bt=9, n=6, l=5, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = F.normalize(torch.randn(bv, n, d, generator=g, dtype=dtype), dim=-1)
    t = F.normalize(torch.randn(bt, l, d, generator=g, dtype=dtype), dim=-1)
    n_real = torch.randint(1, n + 1, (bv,), generator=g)
    l_real = torch.randint(1, l + 1, (bt,), generator=g)
    n_real[0], l_real[0] = n, l  # one full row each
    rm = torch.arange(n)[None, :] < n_real[:, None]
    tm = torch.arange(l)[None, :] < l_real[:, None]
    return r, rm, t, tm


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


# ------------------------------------------------------------------- chunked
@pytest.mark.parametrize("chunk", [1, 2, 4, 9, 64])
def test_chunked_equals_dense_values_and_grads(chunk):
    r, rm, t, tm = ragged_inputs(dtype=torch.float32)
    r1, t1 = r.clone().requires_grad_(), t.clone().requires_grad_()
    r2, t2 = r.clone().requires_grad_(), t.clone().requires_grad_()
    w_vt, w_tv = torch.randn(2, r.shape[0], t.shape[0], generator=torch.Generator().manual_seed(1))
    s_vt, s_tv = region_word_scores(r1, rm, t1, tm, tau=0.05, chunk_size=chunk)
    d_vt, d_tv = dense_region_word(r2, rm, t2, tm, 0.05)
    assert rel_err(s_vt, d_vt) <= 1e-5 and rel_err(s_tv, d_tv) <= 1e-5
    ((s_vt * w_vt).sum() + (s_tv * w_tv).sum()).backward()
    ((d_vt * w_vt).sum() + (d_tv * w_tv).sum()).backward()
    assert rel_err(r1.grad, r2.grad) <= 1e-5
    assert rel_err(t1.grad, t2.grad) <= 1e-5


def test_closed_form_backward_passes_gradcheck():
    r, rm, t, tm = ragged_inputs(bv=3, bt=4, n=4, l=3, d=4, seed=3)
    r.requires_grad_(), t.requires_grad_()
    for v2t, t2v in [(True, True), (True, False), (False, True)]:
        def fn(r_, t_):
            out = region_word_scores(r_, rm, t_, tm, 0.3, chunk_size=3, v2t=v2t, t2v=t2v)
            return tuple(o for o in out if o is not None)
        assert torch.autograd.gradcheck(fn, (r, t), fast_mode=True)


def test_padding_is_ignored_everywhere():
    r, rm, t, tm = ragged_inputs(dtype=torch.float32, seed=5)
    base = region_word_scores(r, rm, t, tm, 0.05, chunk_size=4)
    r2, t2 = r.clone(), t.clone()
    r2[~rm] = torch.randn(int((~rm).sum()), r.shape[-1]) * 100
    t2[~tm] = float("nan")  # padded entries may hold anything
    r2.requires_grad_(), t2.requires_grad_()
    out = region_word_scores(r2, rm, t2, tm, 0.05, chunk_size=4)
    for a, b in zip(out, base):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    (out[0].sum() + out[1].sum()).backward()
    assert torch.isfinite(r2.grad).all() and torch.isfinite(t2.grad).all()
    assert (r2.grad[~rm] == 0).all() and (t2.grad[~tm] == 0).all()
    # a sentence with no real words / a video with no real regions scores 0, no NaN
    tm3, rm3 = tm.clone(), rm.clone()
    tm3[1], rm3[2] = False, False
    s_vt, s_tv = region_word_scores(r, rm3, t, tm3, 0.05, chunk_size=4)
    assert torch.isfinite(s_vt).all() and torch.isfinite(s_tv).all()
    assert (s_vt[:, 1] == 0).all() and (s_tv[2] == 0).all()


def _outputs(r, rm, t, tm, seed=0):
    g = torch.Generator().manual_seed(seed)
    v_cls = F.normalize(torch.randn(r.shape[0], r.shape[-1], generator=g, dtype=r.dtype), dim=-1)
    t_cls = F.normalize(torch.randn(t.shape[0], t.shape[-1], generator=g, dtype=r.dtype), dim=-1)
    return v_cls, t_cls


def test_alignment_loss_matches_dense_reference():
    r, rm, t, tm = ragged_inputs(bv=8, bt=8, seed=7, dtype=torch.float32)
    v_cls, t_cls = _outputs(r, rm, t, tm)
    cfg = OmegaConf.structured(LossConfig(chunk_size=3, local_weight=0.7))
    leaves = [x.clone().requires_grad_() for x in (v_cls, t_cls, r, t)]
    out = AlignmentLoss(cfg)(VideoOutput(leaves[0], leaves[2], rm), TextOutput(leaves[1], leaves[3], tm))
    ref_leaves = [x.clone().requires_grad_() for x in (v_cls, t_cls, r, t)]
    ref, glob, local = dense_loss(ref_leaves[0], ref_leaves[1], ref_leaves[2], rm, ref_leaves[3], tm,
                                  0.05, 0.05, 0.7)
    assert rel_err(out["loss"], ref) <= 1e-5
    assert rel_err(out["global"], glob) <= 1e-5 and rel_err(out["local"], local) <= 1e-5
    out["loss"].backward()
    ref.backward()
    for a, b in zip(leaves, ref_leaves):
        assert rel_err(a.grad, b.grad) <= 1e-5


def test_learnable_temperature_is_clamped_and_trained():
    """The floor is applied to the parameter after a step (as CLIP clamps logit_scale):
    below the floor the forward is exp(log_t) and its gradient is nonzero."""
    cfg = OmegaConf.structured(LossConfig(learnable_temperature=True, temperature=0.05, min_temperature=0.04))
    loss = AlignmentLoss(cfg)
    assert [n for n, _ in loss.named_parameters()] == ["log_temperature"]
    # shape [1] (deepspeed.initialize cannot take 0-d parameters); tau itself is a scalar
    assert loss.log_temperature.shape == (1,) and loss.temperature().shape == ()
    r, rm, t, tm = ragged_inputs(bv=4, bt=4, dtype=torch.float32)
    v_cls, t_cls = _outputs(r, rm, t, tm)
    out = loss(VideoOutput(v_cls, r, rm), TextOutput(t_cls, t, tm))
    out["loss"].backward()
    assert loss.log_temperature.grad is not None and loss.log_temperature.grad != 0
    with torch.no_grad():
        loss.log_temperature.fill_(math.log(0.02))  # below the floor, as an optimizer step may leave it
    assert loss.temperature().item() == pytest.approx(0.02)
    loss.log_temperature.grad = None
    loss(VideoOutput(v_cls, r, rm), TextOutput(t_cls, t, tm))["loss"].backward()
    assert float(loss.log_temperature.grad.abs()) > 1e-4  # still learns there (a clamp in the forward gave 0)
    loss.floor_temperature_()
    assert loss.temperature().item() == pytest.approx(0.04)
    assert AlignmentLoss(OmegaConf.structured(LossConfig(temperature=0.01, min_temperature=0.04))).temperature().item() \
        == pytest.approx(0.04)  # a fixed temperature starts at the floor
    frozen = AlignmentLoss(OmegaConf.structured(LossConfig()))
    assert list(frozen.parameters()) == [] and frozen.temperature().item() == pytest.approx(0.05)
    # a state with the older 0-d log_temperature still loads, learnable or not
    for target in (loss, frozen):
        target.load_state_dict({"log_temperature": torch.tensor(math.log(0.07))})
        assert target.log_temperature.shape == (1,) and target.temperature().item() == pytest.approx(0.07)


def test_bad_loss_values_are_config_errors_at_load():
    from regionvlp.config import ConfigError, load_config

    for bad in ("chunk_size=0", "min_temperature=0.0", "local_weight=-1.0", "temperature=0", "align_temperature=-1"):
        with pytest.raises(ConfigError, match=r"config key 'loss\." + bad.split("=")[0] + "'"):
            load_config(overrides=["loss." + bad])


def test_local_weight_zero_skips_region_word():
    r, rm, t, tm = ragged_inputs(bv=4, bt=4, dtype=torch.float32)
    v_cls, t_cls = _outputs(r, rm, t, tm)
    out = AlignmentLoss(OmegaConf.structured(LossConfig(local_weight=0.0)))(
        VideoOutput(v_cls, r, rm), TextOutput(t_cls, t, tm))
    assert out["local"].item() == 0.0 and out["loss"].item() == pytest.approx(out["global"].item())


# --------------------------------------------------------------- two ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, tmp: str, cases: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for case in cases:
            _dist_case(rank, world, Path(tmp) / case)
    finally:
        dist.destroy_process_group()


def _dist_case(rank: int, world: int, tmp: Path) -> None:
    import torch.distributed as dist

    data = torch.load(Path(tmp) / "inputs.pt")
    lo, hi = data["bounds"][rank]
    # a shared "encoder" weight, so the DeepSpeed-style mean of parameter grads is checked
    weight = data["weight"].clone().requires_grad_()
    rm, tm = data["rm"][lo:hi], data["tm"][lo:hi]
    leaves = {k: data[k][lo:hi].clone().requires_grad_() for k in ("v_cls", "t_cls", "r", "t")}
    r, t = leaves["r"], leaves["t"]
    if rank == 1 and data["trim_rank1"]:  # this rank pads to fewer regions / words than rank 0
        r, rm, t, tm = r[:, :-1], rm[:, :-1], t[:, :-1], tm[:, :-1]
    video = VideoOutput(F.normalize(leaves["v_cls"] @ weight, dim=-1), r, rm)
    text = TextOutput(F.normalize(leaves["t_cls"] @ weight, dim=-1), t, tm)
    cfg = OmegaConf.structured(LossConfig(chunk_size=2, local_weight=0.5, learnable_temperature=True))
    loss_fn = AlignmentLoss(cfg)
    out = loss_fn(video, text)
    out["loss"].backward()
    grads = {k: v.grad for k, v in leaves.items()}
    # what DeepSpeed does with parameter grads: the mean over ranks
    for p in (weight, loss_fn.log_temperature):
        dist.all_reduce(p.grad)
        p.grad /= world
    torch.save({"loss": out["loss"].detach(), "global": out["global"].detach(), "local": out["local"].detach(),
                "grads": grads, "weight_grad": weight.grad, "tau_grad": loss_fn.log_temperature.grad},
               Path(tmp) / f"rank{rank}.pt")


# unequal: 6 + 4 rows, and rank 1 pads to one region and one word fewer than rank 0
CASES = {"equal": [(0, 5), (5, 10)], "unequal": [(0, 6), (6, 10)]}


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """Both cases in one 2-process gloo run (spawning costs seconds on 2 cores)."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("gloo")
    for case, bounds in CASES.items():
        (root / case).mkdir()
        torch.save(_case_inputs(bounds), root / case / "inputs.pt")
    mp.spawn(_dist_worker, args=(2, _free_port(), str(root), list(CASES)), nprocs=2, join=True)
    return root


def _case_inputs(bounds):
    r, rm, t, tm = ragged_inputs(bv=10, bt=10, seed=11, dtype=torch.float32)
    v_cls, t_cls = _outputs(r, rm, t, tm, seed=2)
    weight = torch.eye(r.shape[-1]) + 0.1 * torch.randn(r.shape[-1], r.shape[-1], generator=torch.Generator().manual_seed(4))
    trim = bounds[1][1] - bounds[1][0] != bounds[0][1] - bounds[0][0]
    if trim:  # rank 1's rows have no last region / word, so it may pad shorter
        rm[bounds[1][0]:, -1] = False
        tm[bounds[1][0]:, -1] = False
    return {"v_cls": v_cls, "t_cls": t_cls, "r": r, "rm": rm, "t": t, "tm": tm, "weight": weight, "bounds": bounds,
            "trim_rank1": trim}


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_ranks_equal_one_process(two_rank_results, case):
    tmp_path = two_rank_results / case
    data = torch.load(tmp_path / "inputs.pt")
    rm, tm, weight = data["rm"], data["tm"], data["weight"]

    # one process, whole batch
    w1 = weight.clone().requires_grad_()
    leaves = {k: data[k].clone().requires_grad_() for k in ("v_cls", "t_cls", "r", "t")}
    cfg = OmegaConf.structured(LossConfig(chunk_size=2, local_weight=0.5, learnable_temperature=True))
    loss_fn = AlignmentLoss(cfg)
    out = loss_fn(VideoOutput(F.normalize(leaves["v_cls"] @ w1, dim=-1), leaves["r"], rm),
                  TextOutput(F.normalize(leaves["t_cls"] @ w1, dim=-1), leaves["t"], tm))
    out["loss"].backward()

    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    for res in ranks:  # every rank reports the global-batch loss
        for key in ("loss", "global", "local"):
            assert rel_err(res[key], out[key].detach()) <= 1e-5, key
        assert rel_err(res["weight_grad"], w1.grad) <= 1e-5
        assert rel_err(res["tau_grad"], loss_fn.log_temperature.grad) <= 1e-5
    # each rank's embeddings get world_size x their share of the global gradient, which
    # DeepSpeed's mean over ranks turns back into exactly the one-process gradient
    for key, leaf in leaves.items():
        joined = torch.cat([res["grads"][key] for res in ranks])
        assert rel_err(joined / 2, leaf.grad) <= 1e-5, key


# ------------------------------------------------------------------- bench
def test_bench_baseline_is_the_same_loss_and_bad_sizes_are_user_errors(capsys):
    """`bench loss` compares like with like: its dense baseline computes the chunked loss's value
    and gradients; bad sizes end in a one-line error (exit 2) before any subprocess starts."""
    from regionvlp.bench.loss import dense_alignment_loss, loss_inputs
    from regionvlp.cli import main

    (v_cls, t_cls, r, t), rm, tm = loss_inputs(12, 5, 6, 8, torch.device("cpu"))
    out = AlignmentLoss(OmegaConf.structured(LossConfig(chunk_size=5)))(
        VideoOutput(v_cls, r, rm), TextOutput(t_cls, t, tm))["loss"]
    grads = torch.autograd.grad(out, (v_cls, t_cls, r, t))
    ref = dense_alignment_loss(v_cls, t_cls, r, rm, t, tm, 0.05, 0.05, 1.0)
    ref_grads = torch.autograd.grad(ref, (v_cls, t_cls, r, t))
    assert rel_err(out, ref) <= 1e-5
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) <= 1e-5
    assert main(["bench", "loss", "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err


# ------------------------------------------------------------ fp32 under autocast
def test_losses_and_similarity_run_in_fp32_under_bf16_autocast():
    """Under CPU bf16 autocast (the proxy for the trainer's GPU autocast) the loss, its
    gradients (the region-word backward included) and the eval similarity equal fp32 to
    1e-6 relative: the fp32 regions are not recast to bf16 (bf16 differs by ~1e-3)."""
    from regionvlp.model import DualEncoder

    r, rm, t, tm = ragged_inputs(bv=8, bt=8, seed=11, dtype=torch.float32)
    v_cls, t_cls = _outputs(r, rm, t, tm)
    loss = AlignmentLoss(OmegaConf.structured(LossConfig(chunk_size=3, local_weight=0.7)))

    def run(autocast: bool):
        leaves = [x.clone().requires_grad_() for x in (v_cls, t_cls, r, t)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = loss(VideoOutput(leaves[0], leaves[2], rm), TextOutput(leaves[1], leaves[3], tm))
        out["loss"].backward()
        return out, [x.grad for x in leaves]

    (ref, ref_grads), (got, got_grads) = run(False), run(True)
    for key in ("loss", "global", "local"):
        assert got[key].dtype == torch.float32 and rel_err(got[key], ref[key]) <= 1e-6, key
    for a, b in zip(got_grads, ref_grads):
        assert a.dtype == torch.float32 and rel_err(a, b) <= 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what autocast would have done to the logits
        bf16_logits = v_cls @ t_cls.T
    assert rel_err(bf16_logits.float(), v_cls @ t_cls.T) > 1e-4  # the check above can fail

    model = DualEncoder(torch.nn.Identity(), torch.nn.Identity(), loss)
    video, text = VideoOutput(v_cls, r, rm), TextOutput(t_cls, t, tm)
    want = model.similarity(video, text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim = model.similarity(video, text)
    assert sim.dtype == torch.float32 and rel_err(sim, want) <= 1e-6

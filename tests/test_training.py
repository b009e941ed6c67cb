"""Ray-stacked PaLoRA training (one pass, per-sample preferences) against the M-pass loop,
and a tiny end-to-end run of python/train_multidigits.py."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TOL, assert_rel_close, rel_err

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import palora_kernels  # noqa: E402
from multidigits.nets import MultiLeNet  # noqa: E402
from multidigits.training import ray_loss_loop, ray_loss_stacked  # noqa: E402
from palora_kernels.nn import RayGroupBatchNorm2d  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")



def _model(T, batchnorm, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    classes = [10, 10, 2][:T]
    m = palora_kernels.convert(MultiLeNet(classes, batchnorm=batchnorm), num_tasks=T, rank=2, lora_alpha=2.0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:            # B = 0 at init would make every dA (and the ray mixing) zero
                p.normal_(0, 0.3)
            if "bn" in name:                # non-trivial affine BN parameters
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.2)
    return m.to(dtype).train()


def _batch(T, B=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 1, 14, 14, generator=g)
    y = torch.stack([torch.randint(0, c, (B,), generator=g) for c in [10, 10, 2][:T]], 1)
    return x, y


def _rays(T, M):
    r = torch.rand(M, T, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.05
    return r / r.sum(1, keepdim=True)


def _run(model, fn, x, y, rays, backend):
    model.zero_grad(set_to_none=True)
    with palora_kernels.use_backend(backend):
        loss, task = fn(model, x, y, rays)
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return loss.detach(), task, grads, buffers


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("batchnorm", [False, True], ids=["noBN", "BN"])
@pytest.mark.parametrize("T", [2, 3])
def test_stacked_step_matches_m_pass_loop(T, batchnorm, backend):
    M = 3
    base = _model(T, batchnorm)
    x, y = _batch(T)
    rays = _rays(T, M)
    stacked, loop = copy.deepcopy(base), copy.deepcopy(base)
    oracle = copy.deepcopy(base).double()
    ls, ts, gs, bs = _run(stacked, ray_loss_stacked, x, y, rays.float(), backend)
    ll, tl, gl, bl = _run(loop, ray_loss_loop, x, y, rays.float(), backend)
    lo, to, go, bo = _run(oracle, ray_loss_loop, x.double(), y, rays, "reference")

    tol = TOL[torch.float32]
    assert rel_err(ls, ll) <= tol, "loss: stacked vs loop"
    assert_rel_close(ls, lo, torch.float32, "loss: stacked vs fp64 loop")
    assert_rel_close(ts, to, torch.float32, "per-ray task losses")
    assert set(gs) == set(go) and len(gs) > 0
    scale = max(float(g.abs().max()) for g in go.values())
    for name in go:
        assert go[name].abs().max() > 1e-6 * scale, f"{name}: zero gradient, the comparison would test nothing"
        assert rel_err(gs[name], gl[name]) <= tol, f"grad {name}: stacked vs loop {rel_err(gs[name], gl[name]):.3g}"
        assert_rel_close(gs[name], go[name], torch.float32, f"grad {name}: stacked vs fp64 loop")
    if batchnorm:
        assert any("running_mean" in n for n in bs)
        for name in bo:
            if name.endswith("num_batches_tracked"):
                assert int(bs[name]) == int(bl[name]) == M
            else:
                assert_rel_close(bs[name], bo[name], torch.float32, f"buffer {name}: stacked vs fp64 loop")
                assert rel_err(bs[name], bl[name]) <= tol, f"buffer {name}"


def test_pooled_batchnorm_would_not_match():
    """Negative control: with the BN statistics pooled over all rays (num_groups left at 1 during
    the stacked pass) the gradients differ from the loop, so the test above can fail."""
    T, M = 2, 3
    base = _model(T, True)
    x, y = _batch(T)
    rays = _rays(T, M).float()
    pooled, loop = copy.deepcopy(base), copy.deepcopy(base)
    with palora_kernels.use_backend("torch"):
        xs = x.repeat(M, 1, 1, 1)
        pref = rays.repeat_interleave(x.shape[0], 0)
        with palora_kernels.preference(pooled, pref):
            from multidigits.training import per_sample_task_losses
            task = per_sample_task_losses(pooled(xs), y.repeat(M, 1)).view(M, -1, T).mean(1)
        (rays * task).sum().backward()
    _, _, gl, _ = _run(loop, ray_loss_loop, x, y, rays, "torch")
    worst = max(rel_err(p.grad, gl[n]) for n, p in pooled.named_parameters())
    assert worst > 1e-3


def test_stacked_step_trains_like_loop_for_several_sgd_steps():
    """Five SGD-momentum steps of each path from the same start stay together (BN on), buffers
    included. (Adam is left out here: g / (sqrt(v) + eps) turns the ~1e-7 rounding of near-zero
    gradient entries into updates of up to ~lr, so its weights agree to ~lr, not to 1e-5.)"""
    T, M = 2, 3
    a, b = _model(T, True), _model(T, True)
    x, y = _batch(T, B=8)
    rays = _rays(T, M).float()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (a, b)]
    for _ in range(5):
        for m, fn, opt in ((a, ray_loss_stacked, opts[0]), (b, ray_loss_loop, opts[1])):
            opt.zero_grad()
            fn(m, x, y, rays)[0].backward()
            opt.step()
    moved = max(rel_err(pa, p0) for pa, p0 in zip(a.parameters(), _model(T, True).parameters()))
    assert moved > 1e-3                                    # the steps did change the weights
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert rel_err(pa, pb) <= 1e-5, n
    for (n, ba), bb in zip(a.named_buffers(), b.buffers()):
        assert rel_err(ba.double(), bb.double()) <= 1e-5, n


def test_ray_groups_context_restores():
    m = _model(2, True)
    bns = [mod for mod in m.modules() if isinstance(mod, RayGroupBatchNorm2d)]
    assert len(bns) == 2
    with palora_kernels.nn.ray_groups(m, 4):
        assert all(b.num_groups == 4 for b in bns)
    assert all(b.num_groups == 1 for b in bns)


def _script(tmp_path, *extra):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "python" / "train_multidigits.py"), "--out", str(tmp_path),
           "--epochs", "1", "--train-size", "512", "--val-size", "100", "--test-size", "100",
           "--batch-size", "64", "--no-progress", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "multidigits.json") as f:
        return json.load(f), proc


def test_script_end_to_end_two_tasks(tmp_path):
    res, proc = _script(tmp_path, "--sampler", "annealed", "--rays", "3", "--eval-rays", "5", "--no-bench", "--seeds", "2",
                        "--convergence")
    assert len(res["seeds"]) == 2 and res["config"]["data"] == "hard" and res["config"]["preset"] == "tuned"
    s0 = res["seeds"][0]
    assert s0["palora"]["train"]["steps"] == 512 // 64
    assert s0["palora"]["train"]["image_passes"] == 8 * 64 * 3
    rays = s0["palora"]["rays"]
    assert len(rays) == 5 and rays[0]["ray"] == [0.0, 1.0] and rays[-1]["ray"] == [1.0, 0.0]
    for r in rays:
        for s in ("val", "test"):
            assert all(0 <= a <= 1 for a in r[s]["accuracy"]) and all(v > 0 for v in r[s]["loss"])
    b = s0["baselines"]
    # same total budget: 8 steps x 3 rays = 24 net-steps for each baseline method
    assert len(b["single_task"]) == 2 and all(st["steps"] == 12 for st in b["single_task"])
    assert b["equal_weight"]["steps"] == 24 and b["pamal"]["steps"] == 8
    assert len(b["ls_front"]["nets"]) == 5 and b["ls_front"]["steps_per_net"] == round(24 / 5)
    assert len(b["pamal"]["rays"]) == 5
    hv = s0["hypervolume"]
    for method in ("palora", "pamal", "ls_front"):
        for k in ("errors", "losses"):
            assert 0 <= hv[method]["best_single"][k] <= hv[method]["front"][k] <= 1
    summ = res["summary"]
    assert summ["hypervolume"]["palora"]["front"]["errors"]["values"] == [
        s["hypervolume"]["palora"]["front"]["errors"] for s in res["seeds"]]
    assert len(summ["corners"]) == 2 and len(summ["corners"][0]["paired_diff_palora_minus_single"]["values"]) == 2
    assert set(res["acceptance"]) >= {"monotone_front_on_test", "corners_within_1sd_of_single_task_or_better",
                                      "front_hv_errors_beats_ls_front"}
    assert len(s0["palora"]["hv_per_epoch"]) == 1 and set(res["convergence"]) == {"annealed", "random"}
    assert (tmp_path / "multidigits_front.png").stat().st_size > 10_000
    assert (tmp_path / "multidigits_convergence.png").stat().st_size > 10_000
    assert "hypervolume of errors" in proc.stdout
    # merging the two seeds run separately gives the same summary (each seed is a pure function of its settings)
    import merge_runs
    one = tmp_path / "one"
    res1, _ = _script(one, "--sampler", "annealed", "--rays", "3", "--eval-rays", "5", "--no-bench", "--seeds", "1",
                      "--seed", "1")
    assert res1["seeds"][0]["palora"]["rays"] == res["seeds"][1]["palora"]["rays"]
    assert res1["seeds"][0]["hypervolume"] == res["seeds"][1]["hypervolume"]
    with pytest.raises(ValueError, match="seeds: expected distinct seeds"):
        merge_runs.merge([str(tmp_path / "multidigits.json"), str(one / "multidigits.json")])
    merged = merge_runs.merge([str(tmp_path / "multidigits.json")])
    assert merged["summary"] == res["summary"]


def test_script_three_tasks_unfused_with_batchnorm(tmp_path):
    res, _ = _script(tmp_path, "--tasks", "3", "--rays", "3", "--eval-rays", "3", "--impl", "unfused",
                     "--batchnorm", "--no-bench", "--max-steps", "3", "--seeds", "1", "--ls-rays", "2")
    s0 = res["seeds"][0]
    assert s0["palora"]["train"]["steps"] == 3 and s0["palora"]["train"]["rays_per_step"] == 3
    assert len(s0["palora"]["rays"]) == 6                  # triangular grid, 2 divisions per edge
    assert len(s0["baselines"]["ls_front"]["nets"]) == 3    # the corners: ray_grid(3, 2)
    assert (tmp_path / "multidigits_front.png").exists()


def test_presets_spend_the_same_image_pass_budget():
    # the tuned preset spends the budget of 5 rays x 4 epochs at batch 128 as one ray per step over
    # 20 epochs: 1,860 Adam steps against each single-task net's 930 (5 rays per step: 372)
    import train_multidigits as tm
    from multidigits.training import steps_per_epoch
    tuned, ref = tm.parse_args([]), tm.parse_args(["--preset", "reference", "--batch-size", "128"])
    assert (tuned.sampler, tuned.rays, ref.sampler, ref.rays) == ("dirichlet", 1, "annealed", 5)
    spe = steps_per_epoch(12000, 128)
    assert tuned.epochs * spe * tuned.rays == ref.epochs * spe * ref.rays == 1860
    assert tm.parse_args(["--sampler", "annealed", "--rays", "5"]).sampler == "annealed"   # a flag given wins
    with pytest.raises(SystemExit):
        tm.parse_args(["--sampler", "annealed"])           # the tuned preset's one ray: annealed needs >= 2


def test_sampler_flags_and_monotone_check():
    import train_multidigits as tm
    a = tm.parse_args([])
    assert (a.dirichlet_floor, a.dirichlet_power) == (0.001, 1.0)
    for bad in (["--end-grid", "1.0"], ["--end-grid", "-0.1"], ["--dirichlet-floor", "0"], ["--dirichlet-power", "-1"]):
        with pytest.raises(SystemExit):
            tm.parse_args(bad)
    s = tm.build_sampler(tm.parse_args(["--end-grid", "0.25", "--dirichlet-power", "2"]), "dirichlet", 100, seed=0)
    assert s.start_step == 75 and s.base.power == 2.0 and s.grid.shape == (11, 2)
    # two seeds, 4 rays (task 1's weight rising): seed 0 has one wrong step for each task
    fronts = [[(0.60, 0.90), (0.70, 0.91), (0.80, 0.85), (0.78, 0.70)],
              [(0.62, 0.88), (0.72, 0.86), (0.82, 0.84), (0.86, 0.72)]]
    seeds = [{"palora": {"rays": [{"val": {"accuracy": list(r)}} for r in f]}} for f in fronts]
    m = tm.monotone_check(seeds, "val")
    # mean front: (0.61, 0.89), (0.71, 0.885), (0.81, 0.845), (0.82, 0.71): monotone
    assert m["violations"] == 0 and m["max_violation"] == 0.0 and m["checked_pairs"] == 6
    assert m["per_seed_violations"] == 2
    assert m["end_steps"] == pytest.approx([0.01, 0.005])          # task 1 at its corner, task 2 at its corner
    seeds[1]["palora"]["rays"][3]["val"]["accuracy"][0] = 0.80     # mean task 1: 0.81 -> 0.79 at the end
    m = tm.monotone_check(seeds, "val")
    assert m["violations"] == 1 and m["max_violation"] == pytest.approx(0.02) and m["per_seed_violations"] == 3
    assert m["end_steps"][0] == pytest.approx(-0.02)


def test_adapter_lr_schedule():
    import train_multidigits as tm
    from multidigits.training import palora_loss, train
    from palora_kernels.samplers import make_sampler
    assert tm.adapter_lr_schedule(0.0, 100) is None and tm.parse_args([]).adapter_lr_decay == 0.0
    f = tm.adapter_lr_schedule(0.5, 100)                       # 1 until step 50, then linear to 0
    assert f(0) == f(50) == 1.0 and f(75) == pytest.approx(0.5) and f(99) == pytest.approx(0.02)
    with pytest.raises(SystemExit):
        tm.parse_args(["--adapter-lr-decay", "1.5"])
    # a zero scale freezes the adapters (and only them), at either adapter lr multiplier
    x, y = _batch(2, B=8)
    for mult in (1.0, 2.0):
        m = _model(2, False)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        train(m, x, y, palora_loss(make_sampler("dirichlet", 2, 1, 3)), epochs=1, batch_size=4, lr=1e-2, seed=0,
              max_steps=3, progress=False, adapter_lr_mult=mult, adapter_lr_scale=lambda step: 0.0)
        for n, p in m.named_parameters():
            assert torch.equal(p, before[n]) == ("lora_" in n), n


def test_script_reference_preset_no_baselines_with_eval(tmp_path):
    # --no-baselines without --no-eval used to crash (KeyError 'equal_weight') and lose the JSON
    res, _ = _script(tmp_path, "--preset", "reference", "--no-baselines", "--no-bench", "--seeds", "1",
                     "--sampler", "dirichlet", "--balance", "lb", "--rays", "1", "--eval-rays", "3",
                     "--batch-size", "128", "--data", "easy")
    c = res["config"]
    assert (c["conv_layout"], c["rank"], c["lora_alpha"], c["lr"], c["adapter_lr_mult"]) == \
        ("loralib", 1, 1.0, 1e-3, 2.0)
    s0 = res["seeds"][0]
    assert s0["palora"]["train"]["steps"] == 512 // 128 and "baselines" not in s0
    assert len(s0["palora"]["rays"]) == 3 and "palora" in s0["hypervolume"]


@pytest.mark.slow          # ~60 s under load: the measurement spawns a fresh process per configuration
def test_script_throughput_memory_measurement(tmp_path):
    res, _ = _script(tmp_path, "--no-baselines", "--no-eval", "--seeds", "1", "--max-steps", "2",
                     "--bench-steps", "1", "--bench-rounds", "1")
    assert "summary" not in res and res["seeds"][0]["palora"]["train"]["steps"] == 2
    assert set(res["throughput_memory"]["configs"]) == {"fused/stacked", "unfused/stacked", "unfused/loop",
                                                        "fused/loop"}
    for cfg in res["throughput_memory"]["configs"].values():
        assert cfg["images_per_s"] > 0 and cfg["saved_for_backward_bytes"] > 0


def test_gradient_balanced_loss_is_the_reference_formula():
    from multidigits.training import ray_loss_gradient_balanced, shared_parameters, per_sample_task_losses
    m = _model(2, False, dtype=torch.float64)
    x, y = _batch(2)
    x = x.double()
    rays = _rays(2, 2)
    loss, task = ray_loss_gradient_balanced(m, x, y, rays)
    shared = shared_parameters(m)
    assert shared and not any(n.startswith("heads.") for n, p in m.named_parameters() if any(p is q for q in shared))
    expected = 0.0
    for k, ray in enumerate(rays):
        with palora_kernels.preference(m, ray):
            L = per_sample_task_losses(m(x), y).mean(0)
        torch.testing.assert_close(task[k], L.detach())
        for t in range(2):
            g = torch.autograd.grad(L[t], shared, retain_graph=True)
            norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
            expected = expected + ray[t] * L[t].detach() / (norm + 1e-3)
    torch.testing.assert_close(loss.detach(), expected)


def test_loss_balancer_weights():
    from multidigits.training import LossBalancer
    lb = LossBalancer(2, window=3)
    for _ in range(4):                        # weights stay 1 until more than `window` steps were seen
        assert torch.equal(lb.update(torch.tensor([3.0, 1.0])), torch.ones(2, dtype=torch.float64))
    w = lb.update(torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75], dtype=torch.float64))   # 1 - 3/4, 1 - 1/4


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "loop"])
def test_loss_balancing_weights_the_losses_not_the_preference(stacked):
    # Hand-made two-task example: running losses (3, 1) give w = (1/4, 3/4), the larger loss the
    # smaller weight (the reference's rule). The LB loss of a step is sum_m sum_t w_t lambda_mt L_mt
    # with L at the UNSCALED ray lambda_m: the network must not run at lambda * w (the old code
    # passed rays * w as the preference too, shrinking the adapters during training only).
    from multidigits.training import palora_loss, per_sample_task_losses
    rays = torch.tensor([[1.0, 0.0], [0.3, 0.7]], dtype=torch.float64)
    loss_fn = palora_loss(lambda step, dtype, device: rays.to(dtype=dtype, device=device), stacked=stacked,
                          balance="lb", num_tasks=2)
    for _ in range(loss_fn.balancer.window + 2):
        loss_fn.balancer.update(torch.tensor([3.0, 1.0]))
    w = loss_fn.balancer.weights
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75], dtype=torch.float64))
    m = _model(2, False, dtype=torch.float64)
    x, y = _batch(2)
    x = x.double()
    loss, task = loss_fn(m, x, y, 0)
    expected = 0.0
    for k, ray in enumerate(rays):
        with palora_kernels.preference(m, ray):
            L = per_sample_task_losses(m(x), y).mean(0).detach()
        torch.testing.assert_close(task[k], L)
        expected = expected + (w * ray * L).sum()
    torch.testing.assert_close(loss.detach(), expected)


def test_weight_ensemble_mixes_the_copies():
    from multidigits.training import WeightEnsemble, ensemble_loss
    torch.manual_seed(0)
    ens = WeightEnsemble(lambda: MultiLeNet([10, 10]), 2)
    x, y = _batch(2)
    ray = torch.tensor([0.3, 0.7])
    ens.set_ray(ray)
    out = ens(x)
    mixed = copy.deepcopy(ens.members[0])
    with torch.no_grad():
        for (n, p), p1 in zip(mixed.named_parameters(), ens.members[1].parameters()):
            p.copy_(0.3 * dict(ens.members[0].named_parameters())[n] + 0.7 * p1)
    for a, b in zip(out, mixed(x)):
        torch.testing.assert_close(a, b)
    ens.set_ray(None)
    with pytest.raises(ValueError, match="ray: expected a preference"):
        ens(x)
    loss, task = ensemble_loss(lambda step, dtype, device: torch.tensor([[1.0, 0.0], [0.0, 1.0]]))(ens, x, y, 0)
    loss.backward()
    # ray (1, 0) is copy 0 alone on task 0, ray (0, 1) copy 1 alone on task 1: each copy's head of the
    # other task gets no gradient, its own task's head does
    m0, m1 = ens.members
    assert m0.heads[1][0].weight.grad.abs().max() == 0 and m0.heads[0][0].weight.grad.abs().max() > 0
    assert m1.heads[0][0].weight.grad.abs().max() == 0 and m1.heads[1][0].weight.grad.abs().max() > 0
    assert task.shape == (2, 2)


def test_convergence_title_names_the_compared_samplers():
    from multidigits.plot import convergence_title
    cfg = {"data": "hard", "preset": "tuned", "seed": 0, "rays": 1}
    title = convergence_title({"config": cfg, "convergence": {"dirichlet": [], "random": []}})
    assert "annealed Dirichlet rays vs random rays" in title and "deterministic" not in title
    assert "1 ray(s) per step" in title
    title = convergence_title({"config": {**cfg, "rays": 5}, "convergence": {"annealed": [], "random": []}})
    assert "deterministic annealed schedule vs random rays" in title and "5 ray(s)" in title

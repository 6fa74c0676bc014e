import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE_TEXT
from spinquant import optimize
from spinquant.errors import UserError
from spinquant.families import R1_READERS, R1_WRITERS, layer_linears
from spinquant.models import tiny_llama, tiny_llama_config
from spinquant.optimize import Plan, learn, rotation_bytes, sample_order
from spinquant.pipeline import prepare
from spinquant.quant import setting
from spinquant.rotated_model import RotatedLlama
from spinquant.rotation import rotations_for

CONFIG = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, layers=2)
CPU = torch.device("cpu")


def sharp_tiny_llama(dtype=torch.float32):
    """Weights ×5: confident logits, so 4-bit quantization visibly hurts the loss and rotations can help."""
    model = tiny_llama(tiny_llama_config(**CONFIG), dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(5.0)
    return model


def windows(n=4, seqlen=64, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def plan(**overrides):
    values = dict(
        model="tiny", recipe="w4a8", iters=10, lr=1.5, momentum=0.0, windows=4, seqlen=64, batch_size=4,
        grad_accum=1, seed=0, dtype="fp32", calibration="calib.txt", calibration_sha256="0" * 64,
    )
    return Plan(**{**values, **overrides})


@pytest.mark.parametrize("recipe", ["w4a8", "w4a4kv4", "executorch", "program"])
def test_rotated_model_matches_fused_and_quantized_reference_in_float64(recipe):
    # Reference: rotation.py fuses R1/R2/R4 (and R3) into the weights, quant.py fake-quantizes them.
    # Asymmetric weights: symmetric RTN puts a group's extreme exactly on a rounding tie, where the
    # last bit of two equal products decides the level.
    qc = dataclasses.replace(optimize.RECIPES[recipe], w_sym=False)
    model = sharp_tiny_llama(torch.float64)
    rot = rotations_for("hadamard", model.config, seed=1, r3=qc.quantizes_kv)
    ids = windows(2, 24)
    with torch.no_grad():
        ours = RotatedLlama(copy.deepcopy(model), rot, qc, torch.float64)(ids)
        reference = prepare(copy.deepcopy(model), rot, qc)(ids).logits
    assert (ours - reference).abs().max() < 1e-6 * reference.abs().max()


def test_rotated_model_with_biases_matches_the_fused_reference_in_float64():
    """Qwen2's q/k/v biases and Llama's attention_bias/mlp_bias: input-side ones stay, v's turns by R2, the writers' by R1."""
    config = tiny_llama_config(**CONFIG)
    config.attention_bias = config.mlp_bias = True
    model = tiny_llama(config, dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p))
    qc = dataclasses.replace(optimize.RECIPES["w4a8"], w_sym=False)
    rot = rotations_for("hadamard", model.config, seed=1)
    ids = windows(2, 24)
    with torch.no_grad():
        ours = RotatedLlama(copy.deepcopy(model), rot, qc, torch.float64)(ids)
        reference = prepare(copy.deepcopy(model), rot, qc)(ids).logits
        unbiased = copy.deepcopy(model)
        for module in unbiased.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.zero_()
        without = prepare(unbiased, rot, qc)(ids).logits
    assert (ours - reference).abs().max() < 1e-6 * reference.abs().max()
    assert (without - reference).abs().max() > 1e-2 * reference.abs().max()  # the biases matter: the check above sees them


def test_full_precision_loss_does_not_move_the_rotations():
    # Without quantization the rotated model computes the same function for every R: nothing to learn.
    model = tiny_llama(tiny_llama_config(**CONFIG), dtype=torch.float64)
    rm = RotatedLlama(model, rotations_for("hadamard", model.config, seed=0), setting("fp"), torch.float64)
    before = rm.r1.detach().clone()
    opt = optimize.CayleySGD(rm.rotation_parameters(), lr=1.5)
    rm.loss(windows(2, 32)).backward()
    opt.step()
    assert (rm.r1.detach() - before).abs().max() < 1e-6


def test_loss_goes_down_on_a_tiny_model():
    _, progress = learn(sharp_tiny_llama(), windows(), plan(), CPU, progress_bar=False)
    first, last3 = progress.losses[0], progress.losses[-3:]
    assert max(last3) < first - 0.05


def test_only_rotations_are_trained_and_stay_orthonormal():
    rm, _ = learn(sharp_tiny_llama(), windows(), plan(iters=5), CPU, progress_bar=False)
    assert [p for p in rm.parameters() if p.requires_grad] == rm.rotation_parameters()
    for r in rm.rotation_parameters():
        r = r.detach().double()
        assert (r.T @ r - torch.eye(r.shape[0], dtype=torch.float64)).abs().max() < 1e-5


def test_learned_rotation_file_leaves_full_precision_logits_unchanged(tmp_path):
    rm, _ = learn(sharp_tiny_llama(), windows(), plan(iters=5), CPU, progress_bar=False)
    path = tmp_path / "R.pt"
    path.write_bytes(rotation_bytes(rm))
    model = tiny_llama(tiny_llama_config(**CONFIG))  # float64
    ids = windows(2, 24, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
        rot = rotations_for(str(path), model.config)
        assert not torch.allclose(rot.r1, rotations_for("hadamard", model.config, seed=0).r1, atol=1e-3)  # it learned
        rotated = prepare(model, rot)(ids).logits
    assert (rotated - ref).abs().max() < 1e-5


class Interrupt(Exception):
    pass


def stop_after(calls, monkeypatch, result=None):
    """Make optimize.train_step raise (a killed run) or return `result` (a bad loss) from call `calls` on."""
    real, count = optimize.train_step, [0]

    def step(*args):
        count[0] += 1
        if count[0] <= calls:
            return real(*args)
        if result is None:
            raise Interrupt
        return result

    monkeypatch.setattr(optimize, "train_step", step)


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    p = plan(iters=6, momentum=0.5, windows=6, batch_size=2)  # momentum: the optimizer state must travel too
    data = windows(6)
    full, full_progress = learn(sharp_tiny_llama(), data, p, CPU, progress_bar=False)
    ckpt = tmp_path / "R.ckpt"
    stop_after(3, monkeypatch)  # killed during step 4, after the checkpoint at step 2
    with pytest.raises(Interrupt):
        learn(sharp_tiny_llama(), data, p, CPU, ckpt, checkpoint_every=2, progress_bar=False)
    monkeypatch.undo()
    resumed, resumed_progress = learn(sharp_tiny_llama(), data, p, CPU, ckpt, checkpoint_every=2, resume=True, progress_bar=False)
    assert resumed_progress.losses == full_progress.losses
    for a, b in zip(resumed.rotation_parameters(), full.rotation_parameters()):
        assert torch.equal(a, b)


def test_resume_refuses_a_checkpoint_of_another_plan(tmp_path):
    ckpt = tmp_path / "R.ckpt"
    learn(sharp_tiny_llama(), windows(), plan(iters=2), CPU, ckpt, checkpoint_every=1, progress_bar=False)
    with pytest.raises(UserError, match=r"other settings \(lr\)"):
        learn(sharp_tiny_llama(), windows(), plan(iters=2, lr=0.5), CPU, ckpt, resume=True, progress_bar=False)
    with pytest.raises(UserError, match="no checkpoint at"):
        learn(sharp_tiny_llama(), windows(), plan(iters=2), CPU, tmp_path / "none.ckpt", resume=True, progress_bar=False)


@pytest.mark.parametrize("bad,message", [(float("nan"), "loss is nan"), (1e4, "loss 10000.000 exploded")])
def test_bad_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, bad, message):
    ckpt = tmp_path / "R.ckpt"
    stop_after(4, monkeypatch, result=bad)
    with pytest.raises(UserError, match=f"step 5: {message}.*last good checkpoint"):
        learn(sharp_tiny_llama(), windows(), plan(), CPU, ckpt, checkpoint_every=2, progress_bar=False)
    state = torch.load(ckpt, weights_only=True)
    assert state["progress"]["step"] == 4


def test_sample_order_is_seeded_and_passes_over_every_window():
    order = sample_order(5, 12, seed=3)
    assert torch.equal(order, sample_order(5, 12, seed=3))
    assert sorted(order[:5].tolist()) == list(range(5)) and sorted(order[5:10].tolist()) == list(range(5))
    assert not torch.equal(order, sample_order(5, 12, seed=4))


def test_cli_writes_rotation_sidecar_and_loss_curve(tiny_hf_dir, tmp_path):
    out = tmp_path / "rot" / "R.pt"
    info = optimize.main([
        "--model", str(tiny_hf_dir), "--calib-text", str(tiny_hf_dir.parent / "text.txt"), "--seqlen", "32",
        "--windows", "4", "--batch-size", "2", "--iters", "3", "--dtype", "fp32", "--device", "cpu",
        "--output", str(out), "--checkpoint-every", "1",
    ])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["recipe"] == "w4a8" and saved["iters"] == 3 and saved["windows"] == 4 and saved["final_loss"] == info["final_loss"]
    assert len(saved["calibration_sha256"]) == 64
    assert len(out.with_suffix(".loss.csv").read_text().splitlines()) == 4
    assert out.with_suffix(".loss.png").read_bytes()[:4] == b"\x89PNG"
    state = torch.load(out, weights_only=True)
    assert set(state) == {"R1", "model.layers.0.self_attn.R2", "model.layers.1.self_attn.R2"}


def test_calibration_text_shorter_than_one_window_is_refused(tiny_hf_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(UserError, match="fewer than one window of 2048"):
        optimize.main(["--model", str(tiny_hf_dir), "--calib-text", str(short), "--device", "cpu", "--output", str(tmp_path / "R.pt")])


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    def loss_and_grad(checkpointing):
        model = sharp_tiny_llama()
        rm = RotatedLlama(model, rotations_for("hadamard", model.config, seed=0, r3=True), optimize.RECIPES["w4a4kv4"], torch.float32)
        if checkpointing:
            rm.enable_activation_checkpointing()
        calls = []
        rm.model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
        loss = rm.loss(windows(2, 32))
        loss.backward()
        return (loss.detach(), rm.r1.grad, rm.r2[1].grad), len(calls)

    (plain, plain_calls), (checkpointed, checkpointed_calls) = loss_and_grad(False), loss_and_grad(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the layer really was replayed in backward
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_only_the_running_layer_holds_rotated_weights(checkpointing):
    """Memory: a layer's rotated weights exist while it runs (or is replayed in backward), never all layers' at once."""
    model = sharp_tiny_llama()
    rm = RotatedLlama(model, rotations_for("hadamard", model.config, seed=0), optimize.RECIPES["w4a8"], torch.float32)
    if checkpointing:
        rm.enable_activation_checkpointing()
    layers = rm.model.model.layers
    held = []

    def record(i):
        def hook(*_):
            held.append([j for j, layer in enumerate(layers) if layer.self_attn.q_proj.rotated_weight is not None])
        return hook

    for i, layer in enumerate(layers):
        layer.mlp.down_proj.register_forward_pre_hook(record(i))  # a replay stops once backward has what it needs
    rm.loss(windows(2, 32)).backward()
    assert held == ([[0], [1], [1], [0]] if checkpointing else [[0], [1]])  # backward replays the last layer first
    assert all(m.rotated_weight is None for m in rm.modules() if hasattr(m, "rotated_weight"))
    assert rm.r1.grad is not None and rm.r2[0].grad is not None


def test_loss_in_chunks_equals_the_loss_of_all_logits(monkeypatch):
    def loss_and_grads(chunk):
        monkeypatch.setattr("spinquant.rotated_model.LOSS_CHUNK_TOKENS", chunk)
        model = sharp_tiny_llama(torch.float64)
        rm = RotatedLlama(model, rotations_for("hadamard", model.config, seed=0), optimize.RECIPES["w4a8"], torch.float64)
        loss = rm.loss(windows(3, 32))
        loss.backward()
        return loss.detach(), rm.r1.grad, rm.r2[1].grad

    whole, chunked = loss_and_grads(10**9), loss_and_grads(7)  # 93 targets: 13 chunks of 7 and one of 2
    model = sharp_tiny_llama(torch.float64)
    rm = RotatedLlama(model, rotations_for("hadamard", model.config, seed=0), optimize.RECIPES["w4a8"], torch.float64)
    ids = windows(3, 32)
    reference = torch.nn.functional.cross_entropy(rm(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(whole[0], reference, rtol=1e-12)
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def learn_as_process(rank: int, world: int, port: int, out, plan_fields: dict) -> None:
    """One of `world` processes, as torchrun starts them (its environment variables), learning on CPU over gloo."""
    import os

    from spinquant import data_parallel

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    data_parallel.start("cpu")
    try:
        rm, progress = learn(sharp_tiny_llama(torch.float64), windows(), plan(**plan_fields), CPU, progress_bar=False)
        layer = rm.model.model.layers[0]
        split = {name: rm._shard_dim(name, linear.frozen) for name, linear in layer_linears(layer, R1_READERS + R1_WRITERS).items()}
        torch.save({"rotations": rm.spinquant_state(), "losses": progress.losses, "split": split}, out / f"rank{rank}.pt")
    finally:
        data_parallel.stop()


def test_two_processes_take_the_step_one_process_takes(tmp_path):
    """One step: later ones agree only to the 4-bit roundings that float noise in W·R moves (the loss is piecewise constant)."""
    import socket

    fields = dict(iters=1, dtype="fp64", batch_size=4)
    one, progress = learn(sharp_tiny_llama(torch.float64), windows(), plan(**fields), CPU, progress_bar=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(learn_as_process, args=(2, port, tmp_path, fields), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    readers = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    assert ranks[0]["split"] == {**{f"{'mlp' if r.endswith(('gate_proj', 'up_proj')) else 'self_attn'}.{r}": 0 for r in readers},
                                 "self_attn.o_proj": 1, "mlp.down_proj": 1}  # each process rotated half of every weight
    for two in ranks:  # each process holds the same rotations, and they are the single process's
        assert two["losses"] == pytest.approx(progress.losses, rel=1e-12)
        for name, r in one.spinquant_state().items():
            assert torch.allclose(two["rotations"][name], r, rtol=0, atol=1e-12), name
    assert not torch.allclose(one.r1, rotations_for("hadamard", one.model.config, seed=0).r1.double(), atol=1e-3)  # it learned


def test_a_batch_that_does_not_split_over_the_processes_is_refused(monkeypatch, tiny_hf_dir, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="--batch-size 8 does not split over 3 processes"):
        optimize.main(["--model", str(tiny_hf_dir), "--device", "cpu", "--output", str(tmp_path / "R.pt")])


def test_learning_starts_from_the_init_file_and_refuses_one_with_smoothing(tmp_path):
    model = sharp_tiny_llama()
    start = rotations_for("orthogonal", model.config, seed=3)
    path = tmp_path / "start.pt"
    torch.save({"R1": start.r1.float(), **{f"model.layers.{i}.self_attn.R2": r.float() for i, r in enumerate(start.r2)}}, path)
    rm, _ = learn(model, windows(), plan(iters=1, lr=1e-9, init=str(path)), CPU, progress_bar=False)
    assert (rm.r1.detach().double() - start.r1).abs().max() < 1e-5  # a step of 1e-9 from the file's R1, not from Hadamard
    state = torch.load(path)
    state.update({f"model.layers.{i}.smoothing.{part}": torch.ones(n) for i in range(2) for part, n in
                  (("attention", 64), ("mlp", 64), ("values", 32), ("down", 128))})
    torch.save(state, tmp_path / "smoothed.pt")
    with pytest.raises(UserError, match="holds smoothing scales too: start from one without them"):
        learn(sharp_tiny_llama(), windows(), plan(init=str(tmp_path / "smoothed.pt")), CPU, progress_bar=False)


def test_cli_init_duquant_searches_rotations_without_smoothing_and_records_them(tiny_hf_dir, tmp_path):
    from transformers import AutoConfig

    from spinquant.rotation import load_rotation_file

    model = tmp_path / "tiny"
    shutil.copytree(tiny_hf_dir, model)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT * 2)
    out = tmp_path / "R.pt"
    optimize.main(["--model", str(model), "--calib-text", str(tmp_path / "calib.txt"), "--seqlen", "32", "--windows", "4",
                   "--batch-size", "2", "--iters", "2", "--dtype", "fp32", "--device", "cpu", "--output", str(out), "--init", "duquant"])
    init = Path(json.loads(out.with_suffix(".json").read_text())["init"])
    assert init.parent == model / "spinquant-rotations" and "-duquant-" in init.name
    assert json.loads(init.with_suffix(".json").read_text())["alpha"] is None
    assert load_rotation_file(init, AutoConfig.from_pretrained(model)).smoothing is None
    with pytest.raises(UserError, match="--init nowhere.pt: not hadamard, duquant or a rotation file"):
        optimize.main(["--model", str(model), "--init", "nowhere.pt", "--device", "cpu", "--output", str(out)])

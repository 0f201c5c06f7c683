from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from pipelines.store import ActivationStore
from sae.model import SparseAutoencoder
from sae.train import Normalizer, SAESpec, SAETrainer, TrainerConfig, TrainingSAE, lr_factor, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(store: ActivationStore, batch_size: int, seed: int = 0):
    epoch = 0
    while True:
        yield from store.iter_batches(3, batch_size, shuffle_window=2048, seed=seed, epoch=epoch)
        epoch += 1


def _train(
    trainer: SAETrainer, batches: Iterator[torch.Tensor], log: Callable[[dict[str, float]], object] | None = None
) -> dict[str, float]:
    """Step ``trainer`` to ``config.total_steps`` as ``pipelines.train``'s worker loop does; the last metrics."""
    metrics: dict[str, float] = {}
    while trainer.step < trainer.config.total_steps:
        metrics = trainer.metrics(trainer.train_step(next(batches)))
        if log is not None:
            log(metrics)
    return metrics


def _trainer(store: ActivationStore, specs: list[SAESpec], steps: int, **kw) -> SAETrainer:
    cfg = TrainerConfig(batch_size=256, total_tokens=256 * steps, **kw)
    return SAETrainer(specs, store.d_model, cfg, normalizer=Normalizer.from_stats(store.stats(3)))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_loss_decreases_on_a_small_store(tiny_store: Path, arch: str) -> None:
    store = ActivationStore(tiny_store)
    trainer = _trainer(store, [SAESpec(expansion=4, k=4, architecture=arch, lr=3e-3)], 60)  # type: ignore[arg-type]
    batches = _batches(store, 256)
    name = next(iter(trainer.specs))
    first = float(trainer.train_step(next(batches))[name].loss.detach())
    metrics = _train(trainer, batches)
    assert trainer.step == 60
    assert metrics[f"{name}/loss"] < 0.8 * first
    assert metrics[f"{name}/l0"] > 0


def _assert_same_sae(a: SparseAutoencoder, b: SparseAutoencoder, x: torch.Tensor) -> None:
    torch.testing.assert_close(a.encode(x), b.encode(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a(x), b(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_export_folds_the_normalisation_into_the_weights(arch: str) -> None:
    torch.manual_seed(0)
    d = 16
    sae = TrainingSAE(SAESpec(expansion=4, k=4, architecture=arch), d, precision="fp32")  # type: ignore[arg-type]
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        sae.W_dec.mul_(torch.rand(sae.d_sae, 1) + 0.5)  # decoder norms away from 1
        sae.threshold.fill_(0.5)
    sae.eval()
    normalizer = Normalizer(torch.randn(d) * 3, 0.25)
    raw = torch.randn(32, d) * 4 + normalizer.mean
    exported = sae.to_inference(normalizer)
    assert torch.allclose(exported.W_dec.norm(dim=-1), torch.ones(sae.d_sae), atol=1e-5)
    recon_n = sae.reconstruct(normalizer(raw))  # the training module, on normalised activations
    torch.testing.assert_close(exported(raw), recon_n / normalizer.scale + normalizer.mean, atol=1e-4, rtol=1e-4)
    assert int((exported.encode(raw) != 0).sum()) > 0


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_trained_saes_round_trip_through_sae_lens(tiny_store: Path, tmp_path: Path, arch: str) -> None:
    from sae_lens import SAE

    store = ActivationStore(tiny_store)
    trainer = _trainer(store, [SAESpec(expansion=4, k=4, architecture=arch, lr=3e-3)], 10)  # type: ignore[arg-type]
    _train(trainer, _batches(store, 256))
    ours = next(iter(trainer.export({"hook_name": "blocks.3.hook_resid_post"}).values()))
    ours.save(tmp_path)
    x = store.read(3, limit=64)
    theirs = SAE.load_from_disk(str(tmp_path))
    torch.testing.assert_close(theirs.encode(x), ours.encode(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x), atol=1e-4, rtol=1e-4)
    back = SparseAutoencoder.load(tmp_path)
    assert back.cfg.architecture == arch
    _assert_same_sae(back, ours, x)
    theirs.save_model(str(tmp_path / "resaved"))  # and sae-lens's own save of it loads in ours
    _assert_same_sae(SparseAutoencoder.load(tmp_path / "resaved"), ours, x)


def test_checkpoint_and_resume_match_an_uninterrupted_run(tiny_store: Path, tmp_path: Path) -> None:
    store = ActivationStore(tiny_store)
    specs = [SAESpec(expansion=4, k=4, lr=3e-3), SAESpec(expansion=8, k=4, architecture="batchtopk", lr=3e-3)]
    steps = 24

    def make() -> SAETrainer:
        return _trainer(store, specs, steps, dead_tokens=256, seed=5)  # one-step window: AuxK kicks in

    full = make()
    logged: list[dict[str, float]] = []
    _train(full, _batches(store, 256), log=logged.append)
    assert any(m["topk-4x-k4/auxk"] > 0 for m in logged)  # dead latents appeared and AuxK trained them

    first = make()
    batches = _batches(store, 256)
    for _ in range(steps // 2):
        first.train_step(next(batches))
    first.save(tmp_path)  # the format pipelines.train checkpoints in
    assert "optimizer" in read_checkpoint(tmp_path)[1]
    resumed = make()
    resumed.restore(*read_checkpoint(tmp_path))
    stream = _batches(store, 256)
    for _ in range(resumed.step):  # the data stream picks up where the checkpoint left it
        next(stream)
    _train(resumed, stream)
    assert resumed.step == steps and resumed.tokens == full.tokens
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for name in full.since_fired:
        assert torch.equal(full.since_fired[name], resumed.since_fired[name])


def test_a_checkpoint_without_optimizer_state_restores_the_rest(tmp_path: Path) -> None:
    trainer = SAETrainer([SAESpec(expansion=2, k=2, lr=1e-2)], 8, TrainerConfig(batch_size=16, total_tokens=64))
    trainer.train_step(torch.randn(16, 8))
    trainer.save(tmp_path, optimizer=False)  # as under DeepSpeed, whose engine saves the optimiser
    model_state, state = read_checkpoint(tmp_path)
    assert "optimizer" not in state and state["step"] == 1
    other = SAETrainer([SAESpec(expansion=2, k=2, lr=1e-2)], 8, TrainerConfig(batch_size=16, total_tokens=64, seed=1))
    other.restore(model_state, state)
    assert other.step == 1 and other.tokens == 16 and not other.optimizer.state  # the optimiser is left alone
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(other.model.state_dict()[key], value), key


def test_saes_trained_together_equal_saes_trained_alone(tiny_store: Path) -> None:
    store = ActivationStore(tiny_store)
    a, b = SAESpec(expansion=4, k=4, lr=2e-3), SAESpec(expansion=8, k=8, lr=1e-3)
    together = _trainer(store, [a, b], 8)
    _train(together, _batches(store, 256))
    alone = _trainer(store, [b], 8, seed=0)
    alone.model.saes["topk-8x-k8"].load_state_dict(_trainer(store, [a, b], 8).model.saes["topk-8x-k8"].state_dict())
    _train(alone, _batches(store, 256))
    for key, value in alone.model.saes["topk-8x-k8"].state_dict().items():
        torch.testing.assert_close(together.model.saes["topk-8x-k8"].state_dict()[key], value)


def test_auxk_trains_dead_latents() -> None:
    torch.manual_seed(0)
    sae = TrainingSAE(SAESpec(expansion=4, k=2, lr=1e-3), 8, precision="fp32")
    x = torch.randn(64, 8)
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[:10] = True
    out = sae(x, dead)
    assert float(out.auxk) > 0
    out.loss.backward()
    assert sae.W_dec.grad is not None and float(sae.W_dec.grad[:10].abs().sum()) > 0
    assert sae.encoder.grad is not None and float(sae.encoder.grad[:10].abs().sum()) > 0


def test_learning_rate_schedule() -> None:
    total = 100
    factors = [lr_factor(s, total, 0.1, 0.2) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[50] == 1.0 and factors[79] == 1.0
    assert factors[80] > factors[90] > factors[99] > 0


def test_specs_are_checked() -> None:
    with pytest.raises(ValueError, match="architecture"):
        SAESpec(architecture="gated")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be"):
        TrainingSAE(SAESpec(expansion=1, k=64), 16)
    with pytest.raises(ValueError, match="unique"):
        SAETrainer([SAESpec(), SAESpec()], 16, TrainerConfig())
    assert SAESpec(expansion=8).label(576) == "topk-8x-k32"
    assert SAESpec(expansion=32).learning_rate(576) < SAESpec(expansion=8).learning_rate(576)


def test_non_finite_batch_stops_before_the_update(tiny_store: Path) -> None:
    from sae.train import TrainingDivergedError

    store = ActivationStore(tiny_store)
    trainer = _trainer(store, [SAESpec(expansion=2, k=4, lr=3e-3), SAESpec(expansion=4, k=4, lr=3e-3)], 10)
    batches = _batches(store, 256)
    for _ in range(3):
        trainer.train_step(next(batches))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    last = dict(trainer.last_loss)
    assert all(v is not None and v > 0 for v in last.values())
    bad = next(batches).clone()
    bad[7, 3] = float("nan")
    with pytest.raises(TrainingDivergedError) as info:
        trainer.train_step(bad)
    err = info.value
    assert err.step == 4 and err.names == ["topk-2x-k4", "topk-4x-k4"] and err.what == "loss"
    assert "step 4" in str(err) and "topk-2x-k4" in str(err) and str(last["topk-2x-k4"]) in str(err)
    assert trainer.step == 3
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)  # the weights are the last finite step's
    trainer.train_step(next(batches))  # a finite batch trains on from there
    assert trainer.step == 4


def test_normalizer_refuses_non_finite_statistics() -> None:
    with pytest.raises(ValueError, match="not finite"):
        Normalizer.from_stats({"mean": [0.0, 1.0], "std": [float("inf"), 1.0]})
    with pytest.raises(ValueError, match="not finite"):
        Normalizer.from_sample(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]))
    big = Normalizer.from_sample(torch.randn(512, 16, dtype=torch.float64).float() * 3e4)  # large norms are fine
    assert big.scale == pytest.approx(1 / 3e4, rel=0.1)

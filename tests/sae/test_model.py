from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae.model import SAEConfig, SAEFormatError, SparseAutoencoder


def _trained_like(arch: str = "topk", d_in: int = 32, d_sae: int = 128) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=8))  # type: ignore[arg-type]
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
        sae.threshold.uniform_(0.0, 0.3)
    return sae


def test_topk_encode_keeps_k_nonnegative_latents() -> None:
    sae = _trained_like()
    z = sae.encode(torch.randn(10, 32))
    assert z.shape == (10, 128)
    assert ((z != 0).sum(-1) <= 8).all()
    assert (z >= 0).all()


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "batchtopk"])
def test_save_load_round_trip(tmp_path: Path, arch: str) -> None:
    sae = _trained_like(arch)
    sae.cfg.metadata.update({"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post"})
    sae.save(tmp_path / "sae")
    back = SparseAutoencoder.load(tmp_path / "sae")
    assert back.cfg.architecture == arch
    assert back.cfg.metadata["hook_name"] == "blocks.1.hook_resid_post"
    x = torch.randn(5, 32)
    torch.testing.assert_close(back(x), sae(x))


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "batchtopk"])
def test_sae_lens_loads_ours_with_the_same_outputs(tmp_path: Path, arch: str) -> None:
    from sae_lens import SAE

    sae = _trained_like(arch)
    sae.save(tmp_path)
    theirs = SAE.load_from_disk(str(tmp_path))
    x = torch.randn(6, 32)
    torch.testing.assert_close(theirs.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "standard", "jumprelu"])
def test_we_load_sae_lens_saes(tmp_path: Path, arch: str) -> None:
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(1)
    theirs = {
        "topk": lambda: TopKSAE(TopKSAEConfig(d_in=32, d_sae=96, k=6)),
        "standard": lambda: StandardSAE(StandardSAEConfig(d_in=32, d_sae=96)),
        "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=32, d_sae=96)),
    }[arch]()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
        if arch == "jumprelu":
            theirs.threshold.uniform_(0, 0.3)
    theirs.save_model(str(tmp_path))
    ours = SparseAutoencoder.load(tmp_path)
    x = torch.randn(4, 32)
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x), theirs.decode(theirs.encode(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.hostile
def test_corrupt_sae_directories_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SAEFormatError, match="cfg.json is missing"):
        SparseAutoencoder.load(tmp_path)
    sae = _trained_like()
    sae.save(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SAEFormatError, match="truncated or corrupt"):
        SparseAutoencoder.load(tmp_path)
    sae.save(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="not valid JSON"):
        SparseAutoencoder.load(tmp_path)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="architecture"):
        SAEConfig(d_in=4, d_sae=8, architecture="gated")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be"):
        SAEConfig(d_in=4, d_sae=8, k=9)


@pytest.mark.parametrize("rescale", [True, False])
def test_we_load_sae_lens_topk_trained_with_decoder_norm_rescaling(tmp_path: Path, rescale: bool) -> None:
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(2)
    theirs = TopKSAE(TopKSAEConfig(d_in=16, d_sae=64, k=4, rescale_acts_by_decoder_norm=rescale))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
        theirs.W_dec.mul_(torch.rand(64, 1) * 2 + 0.2)  # decoder norms far from 1
    theirs.save_model(str(tmp_path))
    ours = SparseAutoencoder.load(tmp_path)
    x = torch.randn(8, 16)
    torch.testing.assert_close(ours(x), theirs.decode(theirs.encode(x)), atol=1e-5, rtol=1e-5)
    assert ((ours.encode(x) != 0).sum(-1) <= 4).all()


def test_save_load_round_trip_on_s3_keeps_the_sae_lens_layout(s3_bucket: str, tmp_path: Path) -> None:
    from sae import storage

    sae = _trained_like("jumprelu")
    uri = sae.save(f"{s3_bucket}/saes/L1-jumprelu")
    assert storage.listdir(uri) == ["cfg.json", "sae_weights.safetensors"]
    sae.save(tmp_path / "local")
    for name in ("cfg.json", "sae_weights.safetensors"):  # byte for byte what a local save writes
        assert storage.read_bytes(storage.join(uri, name)) == (tmp_path / "local" / name).read_bytes()
    back = SparseAutoencoder.load(uri)
    x = torch.randn(5, 32)
    torch.testing.assert_close(back(x), sae(x))


@pytest.mark.hostile
def test_missing_or_corrupt_sae_on_s3_names_the_uri(s3_bucket: str) -> None:
    from sae import storage

    with pytest.raises(SAEFormatError, match=f"{s3_bucket}/none is not an SAE directory: cfg.json is missing"):
        SparseAutoencoder.load(f"{s3_bucket}/none")
    uri = _trained_like().save(f"{s3_bucket}/saes/bad")
    weights = storage.join(uri, "sae_weights.safetensors")
    storage.write_bytes(weights, storage.read_bytes(weights)[:100])
    with pytest.raises(SAEFormatError, match=f"{weights} cannot be read"):
        SparseAutoencoder.load(uri)

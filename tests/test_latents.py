"""The generator digest and the latents file that is tied to it."""
import pytest
import torch

from handsoff.errors import HandsoffError
from handsoff.gan.config import GeneratorConfig
from handsoff.gan.digest import generator_digest
from handsoff.gan.networks import Generator
from handsoff.invert.latents import Latents, load_latents, save_latents


def _tiny(seed: int) -> Generator:
    torch.manual_seed(seed)
    return Generator(GeneratorConfig(img_resolution=16, z_dim=8, w_dim=8, mapping_layers=2, channel_base=64,
                                     channel_max=8))


def test_digest_depends_on_weights_only():
    a, b = _tiny(0), _tiny(0)
    assert generator_digest(a) == generator_digest(b)
    with torch.no_grad():
        b.synthesis.b4.const[0, 0, 0] += 1e-3
    assert generator_digest(a) != generator_digest(b)


def test_latents_round_trip_and_checks(tmp_path):
    G = _tiny(0)
    ws = torch.randn(3, G.num_ws, G.w_dim)
    path = save_latents(tmp_path / "l.safetensors", Latents(ws, ["a", "b", "c"], generator_digest(G), {"psnr": [1]}))
    back = load_latents(path, expect_digest=generator_digest(G), expect_shape=(G.num_ws, G.w_dim))
    assert back.names == ["a", "b", "c"] and back.extra == {"psnr": [1]}
    assert torch.equal(back.ws, ws)
    assert torch.equal(back.select(["c", "a"]), ws[[2, 0]])
    with pytest.raises(HandsoffError, match="has no latents for image"):
        back.select(["zz"], path)
    with pytest.raises(HandsoffError, match="made for another generator"):
        load_latents(path, expect_digest=generator_digest(_tiny(1)))
    with pytest.raises(HandsoffError, match="the generator needs"):
        load_latents(path, expect_shape=(G.num_ws + 1, G.w_dim))


@pytest.mark.parametrize("content", [b"", b"not safetensors at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "])
def test_bad_latents_files_are_one_line_errors(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(HandsoffError) as err:
        load_latents(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(HandsoffError, match="no such latents file"):
        load_latents(tmp_path / "missing.safetensors")


def test_safetensors_files_have_the_same_bytes_every_time(tmp_path):
    """The safetensors library orders header metadata by hash; handsoff's files must not vary."""
    import safetensors.torch

    from handsoff.utils.io import safetensors_bytes

    tensors = {"b": torch.ones(3), "a": torch.arange(4.0).reshape(2, 2)}
    metadata = {k: str(i) for i, k in enumerate("wxyzuv")}
    files = {safetensors_bytes(tensors, metadata) for _ in range(10)}
    assert len(files) == 1
    loaded = safetensors.torch.load(files.pop())
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])

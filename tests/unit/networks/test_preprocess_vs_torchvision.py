"""The serving preprocessing (vlltr.model.runtime.preprocess) against the torchvision eval transform training
evaluates with (acceptance 3): photos of many sizes and modes, EXIF, 16-bit greyscale, extreme aspect ratios."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps
from torchvision import transforms as T

from support.images import MAX_PIXELS, SPEC_32, SPEC_224, encode
from vlltr.model.runtime.preprocess import PreprocessSpec, decode_image, preprocess_image

ONE_GREY_LEVEL = 1.0 + 1e-3  # float32 rounding of the normalisation on top of one level


def torchvision_eval(spec: PreprocessSpec):
    return T.Compose(
        [
            T.Resize(spec.resize_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(spec.size),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )


def grey_levels(a: np.ndarray, b: np.ndarray, spec: PreprocessSpec) -> float:
    """Largest difference of two normalised tensors in 0..255 units."""
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return float(np.max(np.abs(a - b) * std * 255.0))


def on_white(img: Image.Image) -> Image.Image:
    """Independent reference for transparency: alpha-blend on white with integer arithmetic."""
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    return Image.fromarray(np.clip(np.floor(rgb + 0.5), 0, 255).astype(np.uint8), "RGB")


def check(data: bytes, reference_rgb: Image.Image, spec: PreprocessSpec, limit: float = ONE_GREY_LEVEL) -> float:
    ours = preprocess_image(decode_image(data, max_pixels=MAX_PIXELS), spec)
    ref = torchvision_eval(spec)(reference_rgb).numpy()
    assert ours.shape == ref.shape == (3, spec.size, spec.size)
    assert ours.dtype == np.float32
    diff = grey_levels(ours, ref, spec)
    assert diff <= limit, f"{diff:.3f} grey levels apart"
    return diff


SIZES = [
    (1, 1),
    (2, 3),
    (31, 17),
    (224, 224),
    (256, 256),
    (255, 300),
    (427, 640),
    (640, 427),
    (1000, 257),
    (2100, 1400),
    (7, 90),
]


@pytest.mark.parametrize("spec", [SPEC_224, SPEC_32], ids=["224", "32"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_rgb_sizes_match_torchvision(photos, size, fmt, spec):
    for photo in photos:
        data = encode(photo.resize(size, Image.Resampling.LANCZOS), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        with Image.open(io.BytesIO(data)) as decoded:
            check(data, decoded.convert("RGB"), spec)


def _variants(photo: Image.Image) -> dict[str, tuple[Image.Image, str]]:
    small = photo.resize((97, 61), Image.Resampling.LANCZOS)
    w, h = photo.size
    ramp = np.tile(np.linspace(0, 255, w, dtype=np.float64), (h, 1)).astype(np.uint8)
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray(ramp, "L"))
    la = photo.convert("L").convert("LA")
    la.putalpha(Image.fromarray(ramp[:, ::-1].copy(), "L"))
    p_trans = photo.quantize(64)
    p_trans.info["transparency"] = 0
    return {
        "L-jpeg": (photo.convert("L"), "JPEG"),
        "L-png": (photo.convert("L"), "PNG"),
        "P-png": (photo.quantize(256), "PNG"),
        "P-transparent-png": (p_trans, "PNG"),
        "RGBA-png": (rgba, "PNG"),
        "LA-png": (la, "PNG"),
        "CMYK-jpeg": (photo.convert("CMYK"), "JPEG"),
        "RGBA-small-png": (rgba.resize((97, 61)), "PNG"),
        "RGB-small-gif": (small, "GIF"),
        "RGB-webp": (photo, "WEBP"),
        "RGB-bmp": (small, "BMP"),
        "RGB-tiff": (photo, "TIFF"),
    }


VARIANTS = list(_variants(Image.new("RGB", (8, 8))))


@pytest.fixture(scope="module")
def encoded_variants(photos) -> list[dict[str, bytes]]:
    out = []
    for photo in photos:
        out.append(
            {
                name: encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
                for name, (img, fmt) in _variants(photo).items()
            }
        )
    return out


@pytest.mark.parametrize("spec", [SPEC_224, SPEC_32], ids=["224", "32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_modes_match_torchvision(encoded_variants, variant, spec):
    for variants in encoded_variants:
        data = variants[variant]
        with Image.open(io.BytesIO(data)) as decoded:
            decoded.load()
            mode = decoded.mode
            has_alpha = mode in ("RGBA", "LA", "PA") or "transparency" in decoded.info
            reference = on_white(decoded) if has_alpha else decoded.convert("RGB")
        check(data, reference, spec)


@pytest.mark.parametrize("orientation,fmt", [(6, "JPEG"), (3, "JPEG"), (6, "PNG"), (3, "PNG"), (8, "PNG")])
def test_exif_orientation_is_applied(photos, orientation, fmt):
    # What is stored is the displayed photo turned back; the EXIF tag says how to display it.
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    for photo in photos:
        stored = photo.transpose(undo[orientation])
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encode(stored, fmt, exif=exif.tobytes())
        with Image.open(io.BytesIO(data)) as decoded:
            assert decoded.getexif().get(0x0112) == orientation
            if fmt == "PNG":  # lossless: the reference is the photo as displayed, independent of Pillow's EXIF code
                reference = photo
            else:
                reference = ImageOps.exif_transpose(decoded).convert("RGB")
        assert reference.size == photo.size
        check(data, reference, SPEC_224)


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits(photos):
    grey = np.asarray(photos[0].convert("L"), dtype=np.uint16)
    img16 = Image.fromarray(grey * 257)
    assert img16.mode.startswith("I;16")
    ours16 = preprocess_image(img16, SPEC_224)
    ours8 = preprocess_image(Image.fromarray(grey.astype(np.uint8), "L"), SPEC_224)
    assert grey_levels(ours16, ours8, SPEC_224) == 0.0
    data = encode(img16, "PNG")
    check(data, Image.fromarray(grey.astype(np.uint8), "L").convert("RGB"), SPEC_224)


def test_extreme_aspect_ratio_stays_cheap_and_close(photos):
    # Beyond EXACT_MAX_ASPECT only the crop's source box is resampled: a 40,000 px strip would otherwise be
    # resized to 10 million pixels. Pillow stores the box as float32, which costs a few grey levels at edges.
    strip = photos[1].resize((20, 1000), Image.Resampling.BILINEAR)
    data = encode(strip, "PNG")
    check(data, strip, SPEC_224, limit=8.0)
    huge = Image.new("RGB", (1, 40_000), (10, 200, 30))
    out = preprocess_image(huge, SPEC_224)
    assert out.shape == (3, 224, 224)
    ref = torchvision_eval(SPEC_224)(Image.new("RGB", (1, 2000), (10, 200, 30))).numpy()
    assert grey_levels(out, ref, SPEC_224) <= ONE_GREY_LEVEL

"""The one evaluation preprocessing definition, shared by training's eval transform and the service.

`preprocess_image` reproduces torchvision's
`Compose([Resize(R, interpolation=BICUBIC), CenterCrop(S), ToTensor(), Normalize(mean, std)])` on a PIL image
(same output sizes, same crop offsets, same Pillow resampling, same float32 arithmetic), after two steps that
torchvision leaves to the caller and that both sides must agree on:

1. EXIF orientation is applied (a phone photo is classified the way it is displayed);
2. the image becomes 8-bit RGB: transparent pixels are composited on white (RGBA, LA, P or L/RGB with a
   transparency key), CMYK/YCbCr/1/L/P go through Pillow's conversion, 16-bit and 32-bit integer greyscale
   (`I;16*`, `I`) are scaled to 8 bits (divided by 257, so 65535 -> 255), float greyscale (`F`) is read as
   0..1 when its maximum is at most 1 and as 0..255 otherwise.

`decode_image` turns untrusted bytes into a PIL image: it reads only the header before deciding, refuses
images over a pixel budget (`ImageTooLargeError`) and anything that is not an image this service reads
(`ImageDecodeError`, `UnsupportedImageTypeError`), and can let the JPEG decoder downscale very large photos
(`draft_min_side`, see its docstring for the measured cost in accuracy of that shortcut).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlltr.errors import ImageDecodeError, ImageTooLargeError, UnsupportedImageTypeError

_INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
# Formats the service decodes. Everything else (PDF, EPS, PSD, ...) is refused before any pixel is read.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO
_EXIF_ORIENTATION = 0x0112
_WHITE = (255, 255, 255)
# Longest/shortest side ratio up to which resizing is exactly torchvision's (see `resize_and_crop`).
EXACT_MAX_ASPECT = 16


@dataclass(frozen=True)
class PreprocessSpec:
    """Evaluation preprocessing: shorter side to `resize_size`, centre crop `size`, normalise.

    Attributes:
        size: side of the square network input.
        resize_size: the shorter image side after resizing (torchvision `Resize(int)`).
        mean, std: per-channel normalisation of 0..1 RGB values.
        interpolation: resampling filter name (`bicubic` for CLIP models).
        jpeg_draft: decode large JPEGs at a reduced size (`draft_jpeg`), in training's evaluation and in the
            service alike, so both still see the same pixels; a run's `data.jpeg_draft` sets it.
    """

    size: int
    resize_size: int
    mean: tuple[float, ...]  # three values each (checked in __post_init__)
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    jpeg_draft: bool = False

    def __post_init__(self) -> None:
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"preprocess size must be a positive integer, got {self.size!r}")
        if int(self.resize_size) != self.resize_size or self.resize_size < 1:
            raise ValueError(f"preprocess resize_size must be a positive integer, got {self.resize_size!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"preprocess mean and std need 3 values each, got {list(self.mean)}, {list(self.std)}")
        if any(not math.isfinite(float(s)) or float(s) <= 0 for s in self.std):
            raise ValueError(f"preprocess std values must be positive, got {list(self.std)}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"preprocess interpolation {self.interpolation!r} unknown; known: {sorted(_INTERPOLATIONS)}"
            )
        # Normalise types so equal specs compare equal whatever sequence types they were built from.
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "resize_size", int(self.resize_size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not isinstance(self.jpeg_draft, bool):
            raise ValueError(f"preprocess jpeg_draft must be true or false, got {self.jpeg_draft!r}")

    @property
    def draft_min_side(self) -> int | None:
        """What `decode_image` / `draft_jpeg` take as `draft_min_side` for this spec (None: full decoding)."""
        return self.resize_size if self.jpeg_draft else None

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `preprocess` section."""
        return {
            "size": self.size,
            "resize_size": self.resize_size,
            "resize": "shortest",
            "crop": "center",
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "fill_alpha": list(_WHITE),
            "jpeg_draft": self.jpeg_draft,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PreprocessSpec:
        """Read a manifest's `preprocess` section; rules this module does not implement are refused."""
        if not isinstance(values, Mapping):
            raise ValueError(f"preprocess section must be an object, got {type(values).__name__}")
        missing = [k for k in ("size", "resize_size", "mean", "std") if k not in values]
        if missing:
            raise ValueError(f"preprocess section lacks {missing}")
        fixed = {"resize": "shortest", "crop": "center", "fill_alpha": list(_WHITE)}
        for key, expected in fixed.items():
            if key in values and values[key] != expected:
                raise ValueError(
                    f"preprocess {key}={values[key]!r} not supported (this service implements {expected!r})"
                )
        return cls(
            size=values["size"],
            resize_size=values["resize_size"],
            mean=tuple(values["mean"]),
            std=tuple(values["std"]),
            interpolation=values.get("interpolation", "bicubic"),
            jpeg_draft=values.get("jpeg_draft", False),  # absent in bundles written before it existed
        )


def resized_size(width: int, height: int, resize_size: int) -> tuple[int, int]:
    """`(w, h)` after torchvision's `Resize(resize_size)`: shorter side to `resize_size`, longer truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize_size, int(resize_size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says (no copy when there is nothing to do)."""
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block must not make the image unusable
        return img
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB with transparency composited on white (module docstring lists the rules per mode)."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _high_depth_to_l(img)
        mode = "L"
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info
    if has_alpha:
        try:
            rgba = img.convert("RGBA")
        except (ValueError, OSError) as exc:
            raise UnsupportedImageTypeError(f"cannot convert a {mode} image with transparency to RGB: {exc}") from exc
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnsupportedImageTypeError(f"pixel mode {mode} cannot be converted to RGB: {exc}") from exc


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        arr = np.nan_to_num(arr * scale, nan=0.0, posinf=255.0, neginf=0.0)
    elif img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
        arr = arr.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def crop_offset(resized: int, crop: int) -> int:
    """The start of a centred crop of `crop` pixels in `resized` (torchvision `CenterCrop`)."""
    # torchvision's CenterCrop: int(round((size - crop) / 2.0)) with Python's round (half to even).
    return int(round((resized - crop) / 2.0))


def resize_and_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """torchvision `Resize(resize_size)` + `CenterCrop(size)` on an RGB image.

    For aspect ratios up to `EXACT_MAX_ASPECT` this is exactly torchvision's path: resize everything with
    Pillow, then crop at torchvision's offsets (zero padding when the resized image is smaller than the crop).
    Beyond that ratio (a 1 x 40,000 strip would otherwise be resized to 256 x 10,240,000 pixels), only the
    crop's source box is resampled (Pillow's `box`): the filter centres are the same up to Pillow storing box
    corners as float32, which moves them by ~1e-5 of the image side and changes a few edge pixels by a few grey
    levels; a small price against a request that could otherwise take the process down.
    """
    width, height = img.size
    new_w, new_h = resized_size(width, height, spec.resize_size)
    resample = _INTERPOLATIONS[spec.interpolation]
    size = spec.size
    covers = new_w >= size and new_h >= size
    if covers and max(new_w, new_h) > EXACT_MAX_ASPECT * min(new_w, new_h):
        left, top = crop_offset(new_w, size), crop_offset(new_h, size)
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return img.resize((size, size), resample, box=box)
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), resample)
    if not covers:
        pad_l = (size - new_w) // 2 if size > new_w else 0
        pad_t = (size - new_h) // 2 if size > new_h else 0
        pad_r = (size - new_w + 1) // 2 if size > new_w else 0
        pad_b = (size - new_h + 1) // 2 if size > new_h else 0
        padded = Image.new("RGB", (new_w + pad_l + pad_r, new_h + pad_t + pad_b), (0, 0, 0))
        padded.paste(img, (pad_l, pad_t))
        img = padded
        new_w, new_h = img.size
        if (new_w, new_h) == (size, size):
            return img
    left, top = crop_offset(new_w, size), crop_offset(new_h, size)
    return img.crop((left, top, left + size, top + size))


def normalize(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """`ToTensor` + `Normalize` in float32: `[3, H, W]`, `(x / 255 - mean) / std`."""
    arr = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((arr - mean) / std).transpose(2, 0, 1))


def preprocess_image(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """The network input for one image: float32 `[3, size, size]` (see the module docstring)."""
    img = to_rgb(apply_exif_orientation(img))
    return normalize(resize_and_crop(img, spec), spec)


def preprocess_batch(images: list[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """`[N, 3, size, size]` float32 for a list of images."""
    out = np.empty((len(images), 3, spec.size, spec.size), dtype=np.float32)
    for i, img in enumerate(images):
        out[i] = preprocess_image(img, spec)
    return out


def decode_image(
    data: bytes | bytearray,
    *,
    max_pixels: int,
    draft_min_side: int | None = None,
    formats: tuple[str, ...] = SUPPORTED_FORMATS,
) -> Image.Image:
    """Decode untrusted image bytes safely.

    The header is read first; an image with more than `max_pixels` pixels is refused before its pixels are
    decoded (`ImageTooLargeError`). Pillow's own bomb guard (`Image.MAX_IMAGE_PIXELS`, global) still applies on
    top: an image over twice that limit raises `ImageTooLargeError` too; the global is left untouched.
    Multi-frame images (GIF, WebP, TIFF) give their first frame.

    Args:
        data: the encoded bytes.
        max_pixels: width * height limit read from the header.
        draft_min_side: when set and the image is a JPEG whose shorter side is over four times this value, the
            decoder's DCT scaling (1/2, 1/4, 1/8) is used while keeping the shorter side at least
            `2 * draft_min_side` (pass the spec's `resize_size`). This makes large photos much cheaper to decode
            but is not bit-identical to decoding in full then resizing (docs/bundle.md records the measured
            difference), so the service passes it when the bundle's spec says `jpeg_draft` (training then
            decoded the same way) or when told to. None (default) decodes in full.
        formats: the Pillow format names accepted.

    Raises:
        ImageDecodeError: empty, corrupt, truncated bytes or not an image.
        UnsupportedImageTypeError: an image format outside `formats`.
        ImageTooLargeError: over the pixel budget.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if not data:
        raise ImageDecodeError("empty image: no bytes received")
    try:
        img = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError as exc:
        # Pillow's own guard (twice Image.MAX_IMAGE_PIXELS) fired while reading the header.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(found.group(1)) if found else None
        raise ImageTooLargeError(
            f"image is {pixels if pixels is not None else 'too many'} pixels, over the limit of "
            f"{min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))}",
            pixels=pixels,
            limit=max_pixels,
        ) from exc
    except UnidentifiedImageError as exc:
        other = _identify_any_format(data)
        if other is not None:
            raise UnsupportedImageTypeError(
                f"image format {other} is not supported (supported: {', '.join(formats)})"
            ) from exc
        raise ImageDecodeError("cannot identify an image in the uploaded bytes") from exc
    except Exception as exc:  # header parsers raise assorted errors on crafted input
        raise ImageDecodeError(f"cannot read the image header: {exc}") from exc
    width, height = img.size
    pixels = width * height
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has an empty size {width}x{height}")
    if pixels > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {pixels} pixels, over the limit of {max_pixels}",
            pixels=pixels,
            limit=max_pixels,
        )
    draft_jpeg(img, draft_min_side)
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image too large: {exc}") from exc
    except Exception as exc:  # truncated data, bad Huffman tables, zlib errors, ...
        raise ImageDecodeError(f"cannot decode the {img.format} image: {exc}") from exc
    return img


def draft_jpeg(img: Image.Image, min_side: int | None) -> None:
    """Before `img.load()`: let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale, keeping the shorter side
    at least `2 * min_side`. No-op for other formats, small images, or `min_side=None`. Training's image
    loader calls it too when the run's preprocessing says `jpeg_draft`."""
    if not min_side or img.format not in ("JPEG", "MPO"):
        return
    width, height = img.size
    if min(width, height) > 2 * 2 * min_side:
        factor = 2 * min_side / min(width, height)
        img.draft(None, (max(1, math.ceil(width * factor)), max(1, math.ceil(height * factor))))


# Signatures of image formats Pillow cannot even identify, so that they get 415 (a known type this service does
# not read) rather than 400 (not an image at all). ISO-BMFF brands cover HEIC/HEIF and AVIF without libavif.
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis")


def _sniff_unsupported(data: bytes | bytearray) -> str | None:
    head = bytes(data[:512])
    if head.startswith(b"%PDF-"):
        return "PDF"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "AVIF" if head[8:12].startswith(b"avi") else "HEIF"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JPEG XL"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith((b"<?xml", b"<!doctype svg", b"<!--")) and b"<svg" in text):
        return "SVG"
    return None


def _identify_any_format(data: bytes | bytearray) -> str | None:
    # Only the header is parsed (Image.open is lazy); nothing of an unsupported format is ever decoded.
    try:
        with Image.open(io.BytesIO(data)) as other:
            return other.format
    except Exception:
        return _sniff_unsupported(data)

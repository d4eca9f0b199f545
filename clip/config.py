"""Architecture of a CLIP ViT model, as plain dataclasses that travel inside checkpoints."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class VisionConfig:
    """Vision transformer shape; image_size is (height, width) in pixels."""

    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns) for image_size."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Class token plus one token per patch."""
        rows, cols = self.grid
        return 1 + rows * cols


@dataclass
class TextConfig:
    """Causal text transformer shape."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8


@dataclass
class CLIPConfig:
    """A CLIP ViT: both towers and the width D of the joint embedding space.

    text=None and embed_dim=None give the image tower alone with unprojected tokens (ln_post output, the vision
    width): CFine's `bert` mode, where the authors delete the visual projection (docs/method.md §9).
    """

    embed_dim: int | None = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig | None = field(default_factory=TextConfig)

    @property
    def token_width(self) -> int:
        """Width of the image tokens the model returns: embed_dim when projected, else the vision width."""
        return self.vision.width if self.embed_dim is None else self.embed_dim

    def vision_only(self) -> "CLIPConfig":
        """The same image tower without the text tower and without the visual projection (docs/method.md §9)."""
        return CLIPConfig(embed_dim=None, vision=self.vision, text=None)

    def to_dict(self) -> dict:
        """Plain JSON-able form (tuples become lists)."""
        data = asdict(self)
        data["vision"]["image_size"] = list(self.vision.image_size)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CLIPConfig":
        """Inverse of to_dict."""
        vision = dict(data["vision"])
        vision["image_size"] = tuple(int(v) for v in vision["image_size"])
        text = None if data.get("text") is None else TextConfig(**data["text"])
        embed_dim = None if data.get("embed_dim") is None else int(data["embed_dim"])
        return cls(embed_dim=embed_dim, vision=VisionConfig(**vision), text=text)

    @classmethod
    def for_arch(cls, arch: str, image_size: tuple[int, int] | None = None) -> "CLIPConfig":
        """The architecture train.py's --clip_arch names ('vit_b16', 'tiny') for --clip none, at image_size (its
        default when None)."""
        build = {"vit_b16": cls.vit_b16, "tiny": cls.tiny}[arch]
        return build() if image_size is None else build(tuple(image_size))

    @classmethod
    def vit_b16(cls, image_size: tuple[int, int] = (224, 224)) -> "CLIPConfig":
        """OpenAI's ViT-B/16 (the paper's backbone)."""
        return cls(embed_dim=512, vision=VisionConfig(tuple(image_size), 16, 768, 12, 12), text=TextConfig())

    @classmethod
    def tiny(cls, image_size: tuple[int, int] = (32, 32), width: int = 64, layers: int = 2) -> "CLIPConfig":
        """A small CLIP-shaped model for tests and the CPU demo (full BPE vocabulary, context 77, 64-wide heads as OpenAI)."""
        return cls(
            embed_dim=width,
            vision=VisionConfig(tuple(image_size), 8, width, layers, max(1, width // 64)),
            text=TextConfig(77, 49408, width, layers, max(1, width // 64)),
        )

"""One config object for CFine: the CLIP backbone shape plus every ratio, temperature and loss weight (docs/method.md §2-5)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from clip.model import CLIPConfig


@dataclass
class CFineConfig:
    """CFine hyper-parameters; the defaults are the authors' CUHK-PEDES run (docs/method.md §6)."""

    clip: CLIPConfig = field(default_factory=CLIPConfig.vit_b16)
    # 'clip': CLIP's text tower, tokens projected to D = clip.embed_dim (the project's default);
    # 'bert': the authors' release (docs/method.md §9): BERT-base text, clip is image-only and unprojected, D = 768.
    text_encoder: str = "clip"
    bert: dict | None = None  # bert mode: the Hugging Face BertConfig as a dict (architecture only, no weights)
    bert_lower_case: bool = True  # bert mode: WordPiece lower-cases (bert-base-uncased)
    bert_max_length: int = 100  # bert mode: ids per caption, [CLS] and [SEP] included (docs/method.md §9)
    num_classes: int = 11003  # training identities (CUHK-PEDES); set from the dataset
    image_ratio: float = 0.1  # k_img = int(N_img * image_ratio)
    text_ratio: float = 0.2  # k_txt = int(L * text_ratio)
    tau_cs: float = 0.07  # CFR temperature
    tau_cd: float = 0.01  # FCD temperature
    k_word: int = 3  # words averaged into each patch's positive word
    k_patch: int = 3  # patches averaged into each word's positive patch
    cmpm_weights: tuple[float, float, float] = (1.0, 1.0, 0.1)  # global, lg1, lg2
    cmpc_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    diversity_weight: float = 0.2
    ranking_weight: float = 10.0
    margin: float = 0.2

    def __post_init__(self):
        if self.text_encoder not in ("clip", "bert"):
            raise ValueError(f"text_encoder {self.text_encoder!r} is unknown; use 'clip' or 'bert'")
        if self.text_encoder == "clip" and (self.clip.text is None or self.clip.embed_dim is None):
            raise ValueError("text_encoder 'clip' needs a CLIP with its text tower and joint projection: CLIP's text "
                             "tokens are text.width wide before projection and the image tokens vision.width, so the "
                             "unprojected (768-d) image tokens have no text partner without a new layer")
        if self.text_encoder == "bert":
            if self.bert is None:
                raise ValueError("text_encoder 'bert' needs the BERT architecture (config.bert)")
            if self.clip.text is not None or self.clip.embed_dim is not None:
                raise ValueError("text_encoder 'bert' uses the image tower alone, unprojected: clip=config.vision_only()")
            if self.bert.get("hidden_size") != self.clip.vision.width:
                raise ValueError(f"BERT's hidden size {self.bert.get('hidden_size')} must equal the image tokens' "
                                 f"width {self.clip.vision.width} (docs/method.md §9: both 768)")

    @property
    def width(self) -> int:
        """D, the token width the head works in: CLIP's joint space, or the vision (= BERT) width in bert mode."""
        return self.clip.token_width

    def to_dict(self) -> dict:
        """Plain JSON-able form, nested CLIP config included (tuples become lists)."""
        data = asdict(self)
        data["clip"] = self.clip.to_dict()
        data["cmpm_weights"] = list(self.cmpm_weights)
        data["cmpc_weights"] = list(self.cmpc_weights)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CFineConfig":
        """Inverse of to_dict; keys missing from an older checkpoint take today's defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"CFine config has unknown keys {unknown}; expected a subset of {sorted(known)}")
        values = dict(data)
        if "clip" in values:
            values["clip"] = CLIPConfig.from_dict(values["clip"])
        for key in ("cmpm_weights", "cmpc_weights"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)

"""One config object for CFine: the CLIP backbone shape plus every ratio, temperature and loss weight (docs/method.md §2-5)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from clip.model import CLIPConfig

from .objectives import LOSS_TERMS, default_loss_weights
from .text_encoders import text_encoder_class


@dataclass
class CFineConfig:
    """CFine hyper-parameters; the defaults are the authors' CUHK-PEDES run (docs/method.md §6).

    A loss weight also reads as an attribute of its name (config.ranking_weight); to_dict writes each one as a key of
    its own, as checkpoints always stored them.
    """

    clip: CLIPConfig = field(default_factory=CLIPConfig.vit_b16)
    # The text encoder's name in models/text_encoders/ (which also says which CLIP config it pairs with):
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
    # Each loss term's weight by its name (models/objectives.py LOSS_TERMS); those not given take their defaults.
    loss_weights: dict[str, Any] = field(default_factory=default_loss_weights)
    margin: float = 0.2  # of the ranking loss
    # Ablation switches (docs/method.md §5, ablation switches); all on is the paper's model.
    mgf: bool = True  # off: no MGF block; each modality's features are [BN(global)] alone (B, 1, D)
    cfr: bool = True  # off: the ranking loss's S has no CFR sim_cs
    fcd: bool = True  # off: the ranking loss's S has no FCD sim_cd

    def __post_init__(self):
        self.loss_weights = checked_loss_weights(self.loss_weights)
        for switch in ABLATION_SWITCHES:
            if not isinstance(getattr(self, switch), bool):
                raise ValueError(f"CFine config: {switch} is {getattr(self, switch)!r}; it takes true or false")
        if not (self.cfr or self.fcd) and self.ranking_weight > 0:
            raise ValueError(f"cfr and fcd both off leave the ranking loss no similarity S, but ranking_weight is "
                             f"{self.ranking_weight:g}: set it to 0 (or turn one of them on)")
        text_encoder_class(self.text_encoder).check_config(self)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not attributes: a loss weight by its name.
        weights = self.__dict__.get("loss_weights") or {}
        if name in weights:
            return weights[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def num_features(self) -> int:
        """n of the (B, n, D) features per modality: 3 ([global, lg1, lg2], docs/method.md §2), 1 with mgf off."""
        return 3 if self.mgf else 1

    @property
    def trains_similarity(self) -> bool:
        """Whether training computes docs/method.md §3-4 S: the ranking loss is weighted and CFR or FCD is on."""
        return self.ranking_weight > 0 and (self.cfr or self.fcd)

    @property
    def width(self) -> int:
        """D, the token width the head works in: CLIP's joint space, or the vision (= BERT) width in bert mode."""
        return self.clip.token_width

    def to_dict(self) -> dict:
        """Plain JSON-able form, nested CLIP config included, each loss weight a key of its own (tuples become lists)."""
        data = asdict(self)
        data["clip"] = self.clip.to_dict()
        for name, value in data.pop("loss_weights").items():
            data[name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CFineConfig":
        """Inverse of to_dict; keys missing from an older checkpoint take today's defaults (the switches: on)."""
        weight_names = set(default_loss_weights())
        known = {f.name for f in fields(cls)} - {"loss_weights"}
        unknown = sorted(set(data) - known - weight_names)
        if unknown:
            raise ValueError(f"CFine config has unknown keys {unknown}; expected a subset of "
                             f"{sorted(known | weight_names)}")
        values = {key: value for key, value in data.items() if key in known}
        if "clip" in values:
            values["clip"] = CLIPConfig.from_dict(values["clip"])
        values["loss_weights"] = {key: value for key, value in data.items() if key in weight_names}
        return cls(**values)


ABLATION_SWITCHES = ("mgf", "cfr", "fcd")  # the settings of the same names, "on"/"off" there, booleans here


def checked_loss_weights(weights: dict[str, Any]) -> dict[str, Any]:
    """Every term's weight (the given ones over the defaults) as Python floats, tuples for per-feature weights."""
    defaults = default_loss_weights()
    unknown = sorted(set(weights) - set(defaults))
    if unknown:
        raise ValueError(f"loss weights {unknown} belong to no loss term; the terms' weights are {sorted(defaults)}")
    checked = {}
    for term in LOSS_TERMS.values():
        value, default = weights.get(term.weight, term.default), term.default
        if isinstance(default, tuple):
            value = tuple(float(v) for v in value)
            if len(value) != len(default):
                raise ValueError(f"loss weight {term.weight} takes {len(default)} values, got {len(value)}")
        else:
            value = float(value)
        checked[term.weight] = value
    return checked

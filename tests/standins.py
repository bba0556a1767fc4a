"""Stand-in diffusion/text models whose module class names match what LyCORIS and sd-scripts
target (Transformer2DModel, ResnetBlock2D, CLIPAttention, CLIPMLP), small enough for CPU tests."""

from __future__ import annotations

import logging

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, d, c):
        super().__init__()
        self.to_q = nn.Linear(d, d, bias=False)
        self.to_k = nn.Linear(c, d, bias=False)
        self.to_v = nn.Linear(c, d, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(d, d)])


class FeedForward(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.net = nn.ModuleList([nn.Linear(d, 4 * d), nn.Identity(), nn.Linear(4 * d, d)])


class BasicTransformerBlock(nn.Module):
    def __init__(self, d, c):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn1 = Attention(d, d)
        self.attn2 = Attention(d, c)
        self.ff = FeedForward(d)


class Transformer2DModel(nn.Module):
    def __init__(self, d, c):
        super().__init__()
        self.norm = nn.GroupNorm(8, d)
        self.proj_in = nn.Linear(d, d)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(d, c)])
        self.proj_out = nn.Linear(d, d)


class ResnetBlock2D(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, d)
        self.conv1 = nn.Conv2d(d, d, 3, padding=1)
        self.time_emb_proj = nn.Linear(32, d)
        self.conv2 = nn.Conv2d(d, d, 3, padding=1)


class StandInUNet(nn.Module):
    def __init__(self, width=64, context=48):
        super().__init__()
        self.conv_in = nn.Conv2d(4, width, 3, padding=1)
        block = nn.Module()
        block.attentions = nn.ModuleList([Transformer2DModel(width, context)])
        block.resnets = nn.ModuleList([ResnetBlock2D(width)])
        self.down_blocks = nn.ModuleList([block])


class CLIPAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))


class CLIPMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = CLIPAttention(d)
        self.mlp = CLIPMLP(d)


class StandInTextEncoder(nn.Module):
    def __init__(self, d=48, layers=1):
        super().__init__()
        self.text_model = nn.Module()
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList([CLIPEncoderLayer(d) for _ in range(layers)])


def lycoris_network(algo_args: dict, dim: int = 4, alpha: float = 2.0, seed: int = 0, module=None, te_width: int = 48):
    """Build a real LyCORIS kohya network on the stand-ins (through ``module``'s create_network,
    default ``lycoris.kohya``; ``te_width=64`` makes every width a power of two, as BOFT needs);
    returns (network, te, unet)."""
    if module is None:
        from lycoris import kohya as module

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    te, unet = StandInTextEncoder(d=te_width), StandInUNet(context=te_width)
    net = module.create_network(1.0, dim, alpha, None, te, unet, **algo_args)
    net.apply_to(te, unet, True, True)
    return net, te, unet


# every LyCORIS algo and option combination the tests build (network_args as sd-scripts passes them)
LYCORIS_ALGOS = {
    "lora": dict(algo="lora"),
    "locon": dict(algo="locon", use_tucker="True"),
    "loha": dict(algo="loha"),
    "lokr": dict(algo="lokr", factor="8"),  # default LoKr: full w2 on small layers, split on fc1/fc2
    "lokr_full_matrix": dict(algo="lokr", factor="8", full_matrix="True"),
    "lokr_decompose_both": dict(algo="lokr", factor="16", decompose_both="True"),
    "full": dict(algo="full"),
    "lokr_norm_dora": dict(algo="lokr", factor="8", train_norm="True", dora_wd="True"),
    "lora_norm_dora": dict(algo="lora", train_norm="True", dora_wd="True"),
    "loha_tucker": dict(algo="loha", use_tucker="True"),
    "lokr_tucker": dict(algo="lokr", factor="8", use_tucker="True"),
    "ia3": dict(algo="ia3"),
    "dylora": dict(algo="dylora", block_size="2"),
    "glora": dict(algo="glora"),
    "diag_oft": dict(algo="diag-oft", rescaled="True"),
    "tlora": dict(algo="tlora"),
    "lora_scalar": dict(algo="lora", use_scalar="True"),
}


def tiny_text_encoder(folder):
    """A 2-layer random BERT (32 wide) and a tokenizer whose vocabulary holds every word of the
    text task (``hina_kohya.bench.text_task``): the task's code path without the 90 MB model."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from hina_kohya.bench import text_task

    words = {w for ws in text_task.CATEGORIES.values() for w in ws}
    words |= {w.strip(".").lower() for t in text_task.TEMPLATES for w in t.split() if w != "{}"}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *sorted(words)]
    path = folder / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    return BertModel(config).eval(), BertTokenizerFast(vocab_file=str(path))

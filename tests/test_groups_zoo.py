"""The two routes agree: ``param_groups(model, rank)`` ("all-linear") and ``GaLoreAdamW(model.named_parameters(),
rank=...)`` project the same weights, on a zoo of model shapes built from code and configs (no downloads):
torchvision-style ResNet (classifier ``fc``, conv kernels), ViT-style ``head``, timm-style ``head.fc``, BERT,
DistilBERT, GPT-2, LLaMA, T5. The head is recognised structurally; targets match whole components."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrgrad

RANK = 2


# ------------------------------------------------------------------ look-alikes (torchvision / timm are not deps)
class BasicBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)


class ResNetLike(nn.Module):
    """torchvision.models.resnet's layout: conv1/bn1, layer1..2 (Sequential of blocks), avgpool, fc."""

    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.layer1 = nn.Sequential(BasicBlock(c), BasicBlock(c))
        self.layer2 = nn.Sequential(BasicBlock(c), BasicBlock(c))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)


class Mlp(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)


class VitBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.attn.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = Mlp(d)


class VitLike(nn.Module):
    """timm's VisionTransformer layout: patch_embed.proj (conv), cls_token/pos_embed, blocks (Sequential), head."""

    def __init__(self, d: int = 16, depth: int = 2, classes: int = 10, timm_head: bool = False,
                 headless: bool = False):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.blocks = nn.Sequential(*[VitBlock(d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        if headless:
            self.head = nn.Identity()
        elif timm_head:  # timm's ClassifierHead: head.fc
            self.head = nn.Module()
            self.head.fc = nn.Linear(d, classes)
        else:
            self.head = nn.Linear(d, classes)


def hf(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    small = {"vocab_size": 64}
    if name == "bert":
        return transformers.BertForSequenceClassification(transformers.BertConfig(
            **small, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_labels=3))
    if name == "distilbert":
        return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
            **small, dim=16, hidden_dim=32, n_layers=2, n_heads=2, num_labels=3))
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**small, n_embd=16, n_layer=2, n_head=2,
                                                                     n_positions=32))
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **small, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            tie_word_embeddings=False))
    if name == "llama_base":
        return transformers.LlamaModel(transformers.LlamaConfig(
            **small, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2))
    if name == "t5":
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            **small, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8))
    raise KeyError(name)


ZOO = {
    "resnet": ResNetLike,
    "vit": VitLike,
    "timm_head_fc": lambda: VitLike(timm_head=True),
    "vit_headless": lambda: VitLike(headless=True),
    "mlp": lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)),
    **{name: (lambda name=name: hf(name)) for name in ("bert", "distilbert", "gpt2", "llama", "llama_base", "t5")},
}

#: the output layer of each model: never projected by either route
HEADS = {
    "resnet": {"fc.weight"}, "vit": {"head.weight"}, "timm_head_fc": {"head.fc.weight"}, "vit_headless": set(),
    "mlp": {"4.weight"}, "bert": {"classifier.weight"}, "distilbert": {"classifier.weight"},
    "gpt2": set(), "llama": {"lm_head.weight"}, "llama_base": set(), "t5": set(),  # tied heads appear once
}


def projected(opt: torch.optim.Optimizer) -> set[str]:
    return {n for g in opt.param_groups if g["rank"] is not None for n in g["param_names"]}


def linear_weights(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}


@pytest.mark.parametrize("name", [n for n in ZOO if n != "resnet"])  # resnet: below (nothing to project)
def test_named_parameters_and_param_groups_project_the_same_weights(name):
    torch.manual_seed(0)
    model = ZOO[name]()
    low, *_ = lrgrad.param_groups(model, rank=RANK)
    by_groups = {n for n, _ in low["params"]}
    by_generator = projected(lrgrad.GaLoreAdamW(model.named_parameters(), rank=RANK))
    by_names = projected(lrgrad.GaLoreAdamW(list(model.named_parameters()), rank=RANK))  # no model: names only
    assert by_generator == by_groups, name
    if name != "mlp":  # a list of pairs has names only: an unnamed MLP's output layer needs the structure
        assert by_names == by_groups, name
    # what is projected: exactly the linear weights but the head (no conv kernel, no embedding)
    expected = linear_weights(model) - HEADS[name]
    named = dict(model.named_parameters())
    expected = {n for n in expected if n in named}  # tied heads are listed under the embedding
    if name in ("gpt2", "t5"):
        expected -= {"lm_head.weight"}
    assert by_groups == expected, name
    assert not HEADS[name] & by_groups


def test_resnet_conv_kernels_and_fc_stay_full_rank_on_both_routes():
    model = ResNetLike()
    # nothing projected although a rank was asked for: said, not silent (it runs at AdamW's memory)
    with pytest.warns(UserWarning, match=r"GaLoreAdamW\(\.\.\., rank=2\): no parameter is projected.*"
                                         r"convolution kernels stay full-rank"):
        opt = lrgrad.GaLoreAdamW(model.named_parameters(), rank=RANK)
    assert projected(opt) == set()  # the only linear is the classifier
    with pytest.raises(ValueError, match="target_modules"):
        lrgrad.param_groups(model, rank=RANK)  # nothing to project is refused, not run full-rank silently
    assert lrgrad.groups.head_modules(model) == {"fc"}


def test_named_convolutions_are_projected_as_out_by_rest_matrices():
    model = ResNetLike(c=16)
    low, _ = lrgrad.param_groups(model, rank=4, target_modules=["layer*.*.conv*"])
    assert {n for n, _ in low["params"]} == {f"layer{i}.{j}.conv{k}.weight" for i in (1, 2) for j in (0, 1)
                                             for k in (1, 2)}
    assert "conv1.weight" in {n for n, _ in lrgrad.param_groups(model, rank=4, target_modules=["conv1"])[0]["params"]}
    # a 4-D kernel steps exactly as its (out, in * kh * kw) matrix does, through refreshes, at rank-r state
    kernel = model.layer1[0].conv1.weight  # (16, 16, 3, 3) -> (16, 144)
    twin = nn.Parameter(kernel.detach().reshape(16, -1).clone())
    opts = [lrgrad.GaLoreAdamW([{"params": [p], "rank": 4}], lr=1e-2, update_proj_gap=3) for p in (kernel, twin)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(7):
        g = torch.randn(16, 144, generator=gen)
        kernel.grad, twin.grad = g.reshape(kernel.shape).clone(), g.clone()
        for opt in opts:
            opt.step()
    assert torch.equal(kernel.detach().reshape(16, -1), twin.detach())
    state_numel = sum(t.numel() for t in opts[0].state[kernel].values() if isinstance(t, torch.Tensor))
    assert state_numel < kernel.numel()  # moments are 16 x 4 each plus a 144 x 4 basis: not 2 x 2304


class TorchvisionVitLike(nn.Module):
    """torchvision.models.vit_b_16's layout: conv_proj, encoder.layers (Sequential of blocks whose attention
    is an nn.MultiheadAttention: its q/k/v projection is the raw param in_proj_weight), heads.head."""

    def __init__(self, d: int = 16, classes: int = 10):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, d, 4, 4)
        self.encoder = nn.Module()
        self.encoder.layers = nn.Sequential(*[nn.TransformerEncoderLayer(d, 2, 4 * d, batch_first=True)
                                              for _ in range(2)])
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(d, classes))


def test_multihead_attention_input_projections_are_linear_weights_on_both_routes():
    model = TorchvisionVitLike()
    low, _ = lrgrad.param_groups(model, rank=RANK)
    by_groups = {n for n, _ in low["params"]}
    opt = lrgrad.GaLoreAdamW(model.named_parameters(), rank=RANK)
    expected = {f"encoder.layers.{i}.{w}.weight" for i in (0, 1) for w in ("self_attn.out_proj", "linear1", "linear2")}
    expected |= {f"encoder.layers.{i}.self_attn.in_proj_weight" for i in (0, 1)}
    assert by_groups == projected(opt) == expected  # not the head, not the conv stem, not the biases
    est = lrgrad.estimate_memory(model, rank=RANK, optimizer="galore_adamw")
    assert est.optimizer_state < lrgrad.estimate_memory(model, optimizer="adamw").optimizer_state
    # separate key/value widths: the three q/k/v weights are projected
    mha = nn.Module()
    mha.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=12)
    mha.out = nn.Linear(16, 4)
    low, _ = lrgrad.param_groups(mha, rank=RANK, target_modules=["attn"])
    assert {n for n, _ in low["params"]} == {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight",
                                             "attn.out_proj.weight"}


def test_head_is_recognised_structurally_before_names():
    assert lrgrad.groups.head_modules(VitLike()) == {"head"}
    assert lrgrad.groups.head_modules(VitLike(timm_head=True)) == {"head.fc"}
    assert lrgrad.groups.head_modules(VitLike(headless=True)) == set()  # the last block's fc2 is no head

    class Odd(nn.Module):  # a classifier under a name no list has
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.to_logits = nn.Linear(8, 5)

    assert lrgrad.groups.head_modules(Odd()) == {"to_logits"}
    assert projected(lrgrad.GaLoreAdamW(Odd().named_parameters(), rank=RANK)) == {"body.weight"}
    # a Hugging Face base model (no LM head): its last linear is a block's down_proj, projected
    assert lrgrad.groups.head_modules(hf("llama_base")) == set()


@pytest.mark.parametrize("cls", [lrgrad.Muon, lrgrad.AuON])
def test_matrix_only_optimizers_send_the_structural_head_to_adamw(cls):
    model = VitLike(timm_head=True)
    opt = cls(model.named_parameters(), lr=0.02)
    adamw = {n for g in opt.param_groups if g.get("rule") == "adamw" for n in g["param_names"]}
    assert "head.fc.weight" in adamw and "blocks.0.mlp.fc1.weight" not in adamw


# ------------------------------------------------------------------ target patterns (issue 33, items 7 and 8)
def test_a_list_entry_is_a_whole_component_not_part_of_one():
    model = hf("distilbert")  # has pre_classifier and classifier
    low, _ = lrgrad.param_groups(model, rank=RANK, target_modules=["pre_classifier", "q_lin"])
    assert {n for n, _ in low["params"]} == {"pre_classifier.weight"} | {
        f"distilbert.transformer.layer.{i}.attention.q_lin.weight" for i in range(2)}
    # "classifier" is the head (excluded): it must not reach into pre_classifier
    with pytest.raises(ValueError, match="'classifier' matched only the excluded head"):
        lrgrad.param_groups(model, rank=RANK, target_modules=["q_lin", "classifier"])
    assert not lrgrad.groups.target_matches("pre_classifier", "classifier")
    assert lrgrad.groups.target_matches("distilbert.transformer.layer.0.attention.q_lin", "attention.q_lin")
    assert lrgrad.groups.target_matches("distilbert.transformer.layer.0.attention.q_lin", "*.layer.*.q_lin")


def test_a_regex_target_is_a_full_match():
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=12, num_attention_heads=2))
    low, _ = lrgrad.param_groups(model, rank=1, target_modules=r".*\.layers\.1\.self_attn\.[qk]_proj")
    assert {n for n, _ in low["params"]} == {"model.layers.1.self_attn.q_proj.weight",
                                             "model.layers.1.self_attn.k_proj.weight"}
    # re.match / re.search would select layers 1, 10 and 11 here; a full match selects no linear: refused
    for pattern in (r"model\.layers\.1", r".*\.layers\.1\.(self_attn|mlp)"):
        with pytest.raises(ValueError, match="matched no linear or convolution module"):
            lrgrad.param_groups(model, rank=1, target_modules=pattern)
    # in a list, a dotted component run selects layer 1 only, never 10/11
    low, _ = lrgrad.param_groups(model, rank=1, target_modules=["layers.1"])
    assert {n.split(".")[2] for n, _ in low["params"]} == {"1"}

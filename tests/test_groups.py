"""The named-groups helper: which weights are projected."""

import pytest
import torch
from tiny_model import TinyLM

import lrgrad


def names(group):
    return [name for name, _ in group["params"]]


def test_all_linear_excludes_embeddings_head_and_non_weights():
    groups = lrgrad.param_groups(TinyLM(), rank=8, update_proj_gap=50)
    low, full = groups
    assert low["rank"] == 8 and low["update_proj_gap"] == 50 and full["rank"] is None
    assert len(names(low)) == 2 * 7 and all(n.endswith("_proj.weight") for n in names(low))
    assert "embed_tokens.weight" in names(full) and "lm_head.weight" in names(full)
    assert "layers.0.mlp.up_proj.bias" not in names(low)
    assert any(n.endswith("up_proj.bias") for n in names(full))


def test_pattern_list_and_tied_weights():
    model = TinyLM()
    model.lm_head.weight = model.embed_tokens.weight  # tied
    low, full = lrgrad.param_groups(model, rank=4, target_modules=["q_proj", "v_proj"])
    assert sorted(n.split(".")[-2] for n in names(low)) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    every = [id(p) for g in (low, full) for p in g["params"]]
    assert len(every) == len(set(every)) == len(list(model.parameters()))


def test_frozen_params_are_left_out():
    model = TinyLM()
    model.embed_tokens.weight.requires_grad_(False)
    low, full = lrgrad.param_groups(model, rank=4)
    assert "embed_tokens.weight" not in names(full)


def test_bad_input():
    with pytest.raises(ValueError, match="target_modules"):
        lrgrad.param_groups(TinyLM(), rank=4, target_modules="all")
    with pytest.raises(ValueError, match="target_modules"):
        lrgrad.param_groups(TinyLM(), rank=4, target_modules=["nothing_matches"])
    with pytest.raises(TypeError, match="target_modules"):
        lrgrad.param_groups(TinyLM(), rank=4, target_modules=[1, 2])
    with pytest.raises(TypeError, match="model"):
        lrgrad.param_groups(torch.randn(3), rank=4)
    with pytest.raises(ValueError, match="rank"):
        lrgrad.GaLoreAdamW(lrgrad.param_groups(TinyLM(), rank=0))


# ---------------------------------------------------------------- galore-torch / Hugging Face targets
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def test_attn_mlp_substrings_select_attention_and_mlp_projections():
    """galore-torch's README and HF's optim_target_modules=["attn", "mlp"]: substring matches."""
    model = tiny_llama()
    low, _ = lrgrad.param_groups(model, rank=4, target_modules=["attn", "mlp"])
    expected = sorted(f"model.layers.{i}.{kind}.{p}_proj.weight" for i in range(2)
                      for kind, projs in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for p in projs)
    assert sorted(names(low)) == expected


def test_regex_string_is_a_full_match_as_in_hugging_face():
    low, _ = lrgrad.param_groups(tiny_llama(), rank=4, target_modules=r".*\.self_attn\.[qk]_proj")
    assert sorted(n.split(".")[-2] for n in names(low)) == ["k_proj", "k_proj", "q_proj", "q_proj"]
    # re.match would accept this prefix of q_proj/k_proj (and re.search "model.layers.1" of layers 10, 11...);
    # a full match selects no module, which is refused by name
    with pytest.raises(ValueError, match=r"\[qk\]'"):
        lrgrad.param_groups(tiny_llama(), rank=4, target_modules=r".*\.self_attn\.[qk]")


def test_a_pattern_that_matches_nothing_is_named_in_the_error():
    with pytest.raises(ValueError, match=r"'atention'"):
        lrgrad.param_groups(tiny_llama(), rank=4, target_modules=["attn", "atention"])
    with pytest.raises(ValueError, match=r"'lm_head' matched only the excluded head"):
        lrgrad.param_groups(tiny_llama(), rank=4, target_modules=["mlp", "lm_head"])


def test_all_linear_projects_bert_output_dense_and_keeps_only_the_head_full_rank():
    """BERT's attention.output.dense / output.dense live under modules named "output": they are block
    matrices, not heads. Only the classifier (get_output_embeddings / head names) stays full-rank."""
    model = tiny_bert()
    low, full = lrgrad.param_groups(model, rank=4)
    low_names = set(names(low))
    for i in range(2):
        for mod in ("attention.self.query", "attention.self.key", "attention.self.value",
                    "attention.output.dense", "intermediate.dense", "output.dense"):
            assert f"bert.encoder.layer.{i}.{mod}.weight" in low_names
    assert "bert.pooler.dense.weight" in low_names
    assert "classifier.weight" in names(full)
    assert not any("embeddings" in n for n in low_names)


def test_head_recognised_by_get_output_embeddings_and_by_tying():
    model = tiny_llama()
    assert lrgrad.groups.head_modules(model) == {"lm_head"}

    class Custom(torch.nn.Module):  # a head under an unusual name, tied to the embedding
        def __init__(self):
            super().__init__()
            self.tok = torch.nn.Embedding(50, 16)
            self.mix = torch.nn.Linear(16, 16)
            self.unembed = torch.nn.Linear(16, 50, bias=False)
            self.unembed.weight = self.tok.weight

    assert lrgrad.groups.head_modules(Custom()) == {"unembed"}
    low, _ = lrgrad.param_groups(Custom(), rank=4)
    assert names(low) == ["mix.weight"]


def test_named_parameters_routing_by_name():
    route = lrgrad.groups.is_embedding_or_head_name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "output.weight", "transformer.wte.weight",
                 "bert.embeddings.word_embeddings.weight", "classifier.weight", "gpt_neox.embed_out.weight"):
        assert route(name), name
    for name in ("model.layers.0.self_attn.q_proj.weight", "bert.encoder.layer.0.attention.output.dense.weight",
                 "bert.encoder.layer.0.output.dense.weight", "transformer.h.0.mlp.c_fc.weight"):
        assert not route(name), name
    model = tiny_bert()
    opt = lrgrad.GaLoreAdamW(model.named_parameters(), rank=4)
    assert "bert.encoder.layer.0.attention.output.dense.weight" in opt.param_groups[0]["param_names"]
    assert "classifier.weight" in opt.param_groups[1]["param_names"]


def decay_split(named):
    """The usual fine-tuning split (Hugging Face's Trainer, nanoGPT): matrices decay, biases and norms do not."""
    named = list(named)
    return [{"params": [(n, p) for n, p in named if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [(n, p) for n, p in named if p.dim() < 2], "weight_decay": 0.0}]


@pytest.mark.parametrize("as_generator", [False, True])
def test_named_pairs_inside_group_dicts_route_like_named_parameters(as_generator):
    """torch.optim takes ``(name, tensor)`` pairs inside group dicts too; a group that takes the
    constructor's rank keeps its embeddings and head full-rank exactly as ``named_parameters()`` does."""
    model = TinyLM()
    if as_generator:
        groups = [{"params": model.named_parameters(), "weight_decay": 0.1}]
    else:
        groups = decay_split(model.named_parameters())
    opt = lrgrad.GaLoreAdamW(groups, rank=8)
    reference = lrgrad.GaLoreAdamW(model.named_parameters(), rank=8)

    def projected(o):
        return sorted(n for g in o.param_groups for n, p in zip(g["param_names"], g["params"]) if o.is_projected(p, g))

    assert projected(opt) == projected(reference)
    assert "embed_tokens.weight" not in projected(opt) and "lm_head.weight" not in projected(opt)
    head = next(g for g in opt.param_groups if "lm_head.weight" in g["param_names"])
    assert head["rank"] is None and head["weight_decay"] == 0.1  # the group's own keys travel with it
    every = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())


def test_a_group_with_its_own_rank_is_taken_as_given():
    """``param_groups(model, rank, target_modules=...)`` writes ``rank`` into its groups: an explicit
    choice (convolutions, or the head on purpose), never re-routed by name."""
    model = TinyLM()
    chosen = [("lm_head.weight", model.lm_head.weight)]
    opt = lrgrad.GaLoreAdamW([{"params": chosen, "rank": 8}], rank=8)
    assert opt.is_projected(model.lm_head.weight, opt.param_groups[0])


class TiedBlocks(torch.nn.Module):
    """An embedding tied to the head, and one block matrix shared by two layers (ALBERT-style)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(40, 32)
        shared = torch.nn.Linear(32, 32)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"proj": shared}) for _ in range(2))
        self.lm_head = torch.nn.Linear(32, 40, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = torch.tanh(layer["proj"](x))
        return self.lm_head(x)


@pytest.mark.parametrize("as_group", [False, True])
@pytest.mark.parametrize("name", ["GaLoreAdamW", "FloraAdamW", "Muon"])
def test_tied_weights_listed_under_every_name_are_stepped_once(name, as_group):
    """``named_parameters(remove_duplicate=False)`` lists a tied tensor under each of its names: routed by
    name, the embedding/head landed in the projected group as one name and the full-rank group as the
    other (torch's "some parameters appear in more than one parameter group"), and a shared block matrix
    twice in one group would be stepped twice. Each tensor is kept once, under its first name, projected
    only if every name of it is: the run equals the one from the deduplicated ``named_parameters()``."""
    torch.manual_seed(0)
    model = TiedBlocks()
    twin = TiedBlocks()
    twin.load_state_dict(model.state_dict())
    listed = list(model.named_parameters(remove_duplicate=False))
    assert len(listed) > len(list(model.parameters()))
    cls = getattr(lrgrad, name)
    opt = cls([{"params": listed}] if as_group else listed, lr=1e-2, rank=4, update_proj_gap=2)
    reference = cls(twin.named_parameters(), lr=1e-2, rank=4, update_proj_gap=2)  # deduplicated by torch
    every = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())

    def projected(o):
        return sorted(n for g in o.param_groups for n, p in zip(g["param_names"], g["params"]) if o.is_projected(p, g))

    assert projected(opt) == projected(reference) == ["layers.0.proj.weight"]
    for step in range(4):
        tokens = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(step))
        for m, o in ((model, opt), (twin, reference)):
            o.zero_grad()
            m(tokens).square().mean().backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("name", ["GaLoreAdamW", "Muon"])
def test_a_shared_block_matrix_listed_under_both_names_is_stepped_once_per_step(name):
    """Without a tied embedding to trip torch's cross-group check, a block matrix shared by two layers and
    listed under both names sat twice in one group (torch only warns) and moved twice per step."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(32, 32)
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList(torch.nn.ModuleDict({"proj": shared}) for _ in range(2)),
                                 "out": torch.nn.Linear(32, 8)})
    opt = getattr(lrgrad, name)(list(model.named_parameters(remove_duplicate=False)), lr=1e-2, rank=4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[shared.weight]["step"] == 1
    assert sum(p is shared.weight for g in opt.param_groups for p in g["params"]) == 1


@pytest.mark.parametrize("name", sorted(lrgrad.OPTIMIZERS))
@pytest.mark.parametrize("how", ["list", "group", "add_param_group"])
def test_a_bare_tensor_listed_twice_is_refused_not_stepped_twice(name, how):
    """torch.optim only warns about a tensor twice in one group, then steps it twice per step (its moments,
    bias correction and refresh schedule run at double speed, silently); refused here, naming both positions."""
    weight = torch.nn.Parameter(torch.randn(16, 8))
    other = torch.nn.Parameter(torch.randn(16, 8))
    cls = lrgrad.OPTIMIZERS[name]
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match=r"params.*positions 0 and 2"):
        if how == "list":
            cls([weight, other, weight], lr=1e-2)
        elif how == "group":
            cls([{"params": [weight, other, weight]}], lr=1e-2)
        else:
            opt = cls([torch.nn.Parameter(torch.randn(4, 4))], lr=1e-2)
            opt.add_param_group({"params": [weight, other, weight]})
    if how == "add_param_group":  # the refused group left nothing behind
        assert len(opt.param_groups) == 1

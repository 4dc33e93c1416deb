import pytest
import torch
import transformers as T
from conftest import CASES, NUM_BLOCKS, tiny_model

from hf_freeze import UnsupportedModelError, find_layout
from hf_freeze.layout import BLOCKS_PATH_OVERRIDES, _find_blocks_path

EXPECTED_BLOCKS = {
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "distilbert": "transformer.layer",
    "mpnet": "encoder.layer",
    "gpt2": "h",
    "llama": "layers",
    "qwen2": "layers",
}
EXPECTED_EMBEDDINGS = {
    "bert": {"embeddings"},
    "roberta": {"embeddings"},
    "distilbert": {"embeddings"},
    "mpnet": {"embeddings", "encoder.relative_attention_bias"},
    "gpt2": {"wte", "wpe", "drop"},
    "llama": {"embed_tokens", "rotary_emb"},
    "qwen2": {"embed_tokens", "rotary_emb"},
}


@pytest.mark.parametrize(("family", "head"), CASES)
def test_finds_blocks_embeddings_and_head_of_every_family(family, head):
    model = tiny_model(family, head)
    layout = find_layout(model)
    prefix = "" if head == "base" else model.base_model_prefix + "."
    assert layout.blocks_path == prefix + EXPECTED_BLOCKS[family]
    assert layout.num_blocks == NUM_BLOCKS
    assert set(layout.embedding_names) == {prefix + name for name in EXPECTED_EMBEDDINGS[family]}
    # every parameter belongs to exactly one of: embeddings, a block, the head
    in_prefix = {id(p) for m in layout.prefix_modules(NUM_BLOCKS) for p in m.parameters()}
    head_params = layout.head_parameters(model)
    assert {id(p) for p in model.parameters()} == in_prefix | {id(p) for p in head_params}
    if head != "base":
        assert head_params


def test_blocks_are_in_forward_order():
    model = tiny_model("llama", "causal")
    layout = find_layout(model)
    order = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: order.append(i)) for i, b in enumerate(layout.blocks)]
    model(input_ids=torch.tensor([[5, 6, 7]]))
    for handle in handles:
        handle.remove()
    assert order == list(range(NUM_BLOCKS))


def test_model_without_block_list_names_what_it_found():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match=r"no nn.ModuleList of identical blocks \(found modules: .*Linear"):
        find_layout(model)


def test_encoder_decoder_models_ask_for_blocks_path():
    config = T.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=16, num_layers=2, num_heads=2)
    with pytest.raises(UnsupportedModelError, match="encoder-decoder .* Pass `blocks_path=`"):
        find_layout(T.T5ForConditionalGeneration(config))


def test_blocks_path_escape_hatch_and_its_errors():
    model = tiny_model("bert", "seq")
    assert find_layout(model, blocks_path="bert.encoder.layer").num_blocks == NUM_BLOCKS
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        find_layout(model, blocks_path="bert.decoder.layer")
    with pytest.raises(UnsupportedModelError, match="not a non-empty nn.ModuleList"):
        find_layout(model, blocks_path="bert.encoder")


def test_ambiguous_block_lists_are_an_error_not_a_guess():
    class TwoStacks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.left = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
            self.right = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])

    with pytest.raises(UnsupportedModelError, match=r"several block lists of length 3: \['left', 'right'\]"):
        find_layout(TwoStacks())


def test_nested_lists_inside_blocks_are_not_the_stack():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(8)])

    class Model(torch.nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block() for _ in range(3)])

    assert _find_blocks_path(Model()) == "layers"


def test_override_table_wins_over_the_generic_rule(monkeypatch):
    # The generic rule covers every family above, so the table ships empty; an entry must be honoured.
    model = tiny_model("bert", "seq")

    def generic_rule_fails(model):
        raise AssertionError("the generic rule ran despite an override")

    monkeypatch.setattr("hf_freeze.layout._find_blocks_path", generic_rule_fails)
    monkeypatch.setitem(BLOCKS_PATH_OVERRIDES, "bert", "bert.encoder.layer")
    assert find_layout(model).blocks_path == "bert.encoder.layer"


def test_a_traced_forward_that_fails_unexpectedly_is_a_clear_error():
    # Falling back to the input embeddings alone would leave the position / token-type embeddings and the
    # LayerNorm trainable and outside the fingerprint while cached states went stale.
    model = tiny_model("bert", "seq")

    def broken(module, args):
        raise RuntimeError("kernel exploded")

    model.bert.embeddings.LayerNorm.register_forward_pre_hook(broken)
    with pytest.raises(UnsupportedModelError, match=r"BertForSequenceClassification.*RuntimeError: kernel exploded"):
        find_layout(model)


def test_a_model_that_needs_more_inputs_is_refused_not_half_frozen():
    # T5's decoder needs `decoder_input_ids`: tracing to its first block cannot run on `input_ids` alone.
    config = T.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=16, num_layers=2, num_heads=2)
    model = T.T5ForConditionalGeneration(config)
    with pytest.raises(UnsupportedModelError, match="failed with ValueError: You must specify"):
        find_layout(model, blocks_path="decoder.block")
    encoder = find_layout(model, blocks_path="encoder.block")
    assert encoder.embedding_names == ("encoder.embed_tokens", "encoder.dropout")


def test_blocks_the_forward_never_runs_are_refused():
    model = tiny_model("bert", "seq")
    model.extra = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
    with pytest.raises(UnsupportedModelError, match="without calling block 0 of `extra`"):
        find_layout(model, blocks_path="extra")


def test_a_model_that_takes_no_input_ids_uses_its_input_embeddings():
    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])

        def get_input_embeddings(self):
            return self.embed

        def forward(self, tokens):
            hidden = self.embed(tokens)
            for layer in self.layers:
                hidden = layer(hidden)
            return hidden

    layout = find_layout(Tagger())
    assert layout.blocks_path == "layers" and layout.embedding_names == ("embed",)

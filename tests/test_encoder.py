"""Unit tests for BERT-family encoders (models/encoder.py) and MLM/NSP data (data/masking.py)."""
from __future__ import annotations

import inspect

import pytest
import torch

from data.masking import (IGNORE_INDEX, Masker, MaskingConfig, SentencePairs, join_pair, masking_config,
                          pad_pairs)
from data.tokenizer import byte_tokenizer
from models.encoder import (ALBERT_EMBEDDING_DIM, PRESETS, Encoder, EncoderConfig, encoder_config,
                            param_counts)
from models.moe import SwitchConfig, SwitchMLP

torch.set_num_threads(1)

TOK = byte_tokenizer()


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # deduplicates tied and shared weights


def random_samples(n: int, T: int, seed: int = 0) -> torch.Tensor:
    """(n, T) ordinary byte ids framed as [CLS] ... [SEP] ... [SEP] with trailing padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, T), generator=g)
    ids[:, 0] = TOK.cls_id
    ids[:, T // 2] = TOK.sep_id
    ids[:, -5] = TOK.sep_id
    ids[:, -4:] = TOK.pad_id
    return ids


def docstring_documents(max_docs: int = 200) -> list[list[list[int]]]:
    """Stdlib docstrings as documents of paragraph segments, byte-tokenized (no download needed)."""
    import collections
    import json
    import pathlib
    import textwrap

    docs = []
    for module in (inspect, collections, json, pathlib, textwrap):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            segments = [TOK.encode(p) for p in doc.split("\n\n") if len(p) > 20]
            if segments:
                docs.append(segments)
    return docs[:max_docs]


# ----------------------------------------------------------------------------- masking


def test_masking_proportions_on_a_large_sample():
    masker = Masker.for_tokenizer(MaskingConfig(seed=1), TOK)
    ids = random_samples(1000, 128)
    inputs, labels = masker.mask_batch(ids, range(len(ids)))
    special = torch.isin(ids, masker.special_ids)
    chosen = labels != IGNORE_INDEX
    assert chosen.sum().item() / (~special).sum().item() == pytest.approx(0.15, abs=0.002)
    n = chosen.sum().item()
    to_mask = (inputs == TOK.mask_id) & chosen
    unchanged = (inputs == ids) & chosen
    other = chosen & ~to_mask & ~unchanged
    assert to_mask.sum().item() / n == pytest.approx(0.8, abs=0.01)
    # a random draw equals the original 1 time in 256, so "unchanged" is 0.1 + 0.1/256
    assert unchanged.sum().item() / n == pytest.approx(0.1, abs=0.01)
    assert other.sum().item() / n == pytest.approx(0.1, abs=0.01)
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])               # nothing outside the chosen changes


def test_specials_never_masked_or_drawn():
    masker = Masker.for_tokenizer(MaskingConfig(mask_prob=0.5), TOK)
    ids = random_samples(300, 64)
    inputs, labels = masker.mask_batch(ids, range(len(ids)))
    special = torch.isin(ids, masker.special_ids)
    assert (labels[special] == IGNORE_INDEX).all()
    assert torch.equal(inputs[special], ids[special])
    replaced = (inputs != ids) & (inputs != TOK.mask_id)
    assert replaced.any()
    assert not torch.isin(inputs[replaced], masker.special_ids).any()  # random tokens are ordinary ones
    # a sequence of only specials stays as it is
    only_specials = torch.tensor([TOK.cls_id, TOK.sep_id, TOK.pad_id])
    x, y = masker.mask(only_specials, 0)
    assert torch.equal(x, only_specials) and (y == IGNORE_INDEX).all()


def test_static_masking_is_fixed_per_sample():
    masker = Masker.for_tokenizer(masking_config("bert", seed=3), TOK)
    ids = random_samples(1, 128)[0]
    a, b = masker.mask(ids, index=7, epoch=0), masker.mask(ids, index=7, epoch=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = masker.mask(ids, index=8, epoch=0)                            # another sample index, another mask
    assert not torch.equal(a[1], c[1])


def test_dynamic_masking_changes_every_epoch_and_is_reproducible():
    masker = Masker.for_tokenizer(masking_config("roberta", seed=3), TOK)
    ids = random_samples(1, 128)[0]
    epoch0, epoch1 = masker.mask(ids, 7, epoch=0), masker.mask(ids, 7, epoch=1)
    assert not torch.equal(epoch0[1], epoch1[1])
    again = masker.mask(ids, 7, epoch=1)
    assert torch.equal(epoch1[0], again[0]) and torch.equal(epoch1[1], again[1])


def test_masks_do_not_depend_on_batch_composition():
    masker = Masker.for_tokenizer(masking_config("roberta"), TOK)
    ids = random_samples(6, 64)
    order = [4, 0, 5, 2, 1, 3]
    full, _ = masker.mask_batch(ids, range(6), epoch=2)
    shuffled, _ = masker.mask_batch(ids[order], order, epoch=2)
    assert torch.equal(full[order], shuffled)


# ----------------------------------------------------------------------------- sentence pairs


def test_join_pair_layout_and_truncation():
    ids, types = join_pair([1, 2, 3], [4, 5], cls_id=9, sep_id=8, max_len=16)
    assert ids == [9, 1, 2, 3, 8, 4, 5, 8]
    assert types == [0, 0, 0, 0, 0, 1, 1, 1]
    ids, types = join_pair(list(range(10)), [50, 51], cls_id=9, sep_id=8, max_len=8)
    assert len(ids) == 8 and ids == [9, 0, 1, 2, 8, 50, 51, 8]        # the longer segment is trimmed


def test_nsp_pairs_half_next_half_random():
    docs = [[[100 * d + s] * 3 for s in range(4)] for d in range(10)]  # segment (d, s) filled with 100d+s
    pairs = SentencePairs(docs, TOK.cls_id, TOK.sep_id, max_len=32, seed=0)
    labels = []
    for i in range(len(pairs)):
        for epoch in range(25):
            ex = pairs.nsp(i, epoch)
            d, s = pairs.positions[i]
            a_end = ex.input_ids.index(TOK.sep_id)
            a, b = ex.input_ids[1:a_end], ex.input_ids[a_end + 1:-1]
            assert ex.input_ids[0] == TOK.cls_id and ex.input_ids[-1] == TOK.sep_id
            assert ex.token_type_ids == [0] * (a_end + 1) + [1] * (len(b) + 1)
            assert a == [100 * d + s] * 3
            if ex.label == 0:
                assert b == [100 * d + s + 1] * 3                     # the actual next segment
            else:
                assert b[0] // 100 != d                               # a segment of another document
            if s == 3:
                assert ex.label == 1                                  # a document's last segment has no next
            else:
                labels.append(ex.label)
    assert sum(labels) / len(labels) == pytest.approx(0.5, abs=0.05)
    assert pairs.nsp(5, epoch=1) == pairs.nsp(5, epoch=1)            # seeded


def test_sop_pairs_and_padding():
    docs = [[[10 * d + s] for s in range(3)] for d in range(4)]
    pairs = SentencePairs(docs, TOK.cls_id, TOK.sep_id, max_len=16)
    swapped = 0
    for epoch in range(200):
        ex = pairs.sop(0, epoch)
        order = [ex.input_ids[1], ex.input_ids[3]]
        assert order == ([1, 0] if ex.label else [0, 1])
        swapped += ex.label
    assert 70 < swapped < 130
    batch = pad_pairs([pairs.nsp(i) for i in range(4)], TOK.pad_id, length=12)
    assert batch["input_ids"].shape == (4, 12) and batch["labels"].shape == (4,)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == TOK.pad_id).all()


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("family", ["bert", "roberta", "albert"])
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_param_counts_match_module(family, preset):
    cfg = encoder_config(family, preset)
    assert param_counts(cfg)["total"] == n_params(Encoder(cfg))


def test_param_counts_bert_base_is_the_published_size():
    # BERT-base with its 30522-token WordPiece vocab: 110,106,428 parameters (HF BertForPreTraining)
    assert param_counts(encoder_config("bert", "base", vocab_size=30522))["total"] == 110_106_428


def test_tiny_preset_is_a_few_hundred_thousand_params():
    assert 100_000 < param_counts(encoder_config("bert", "tiny"))["total"] < 1_000_000


def test_switch_encoder_param_counts_and_aux_loss():
    cfg = encoder_config("bert", "tiny", moe=SwitchConfig(num_experts=3, every=2))
    model = Encoder(cfg)
    assert param_counts(cfg)["total"] == n_params(model)
    assert [isinstance(b.mlp, SwitchMLP) for b in model.blocks] == [False, True, False]
    ids = random_samples(2, 32)
    logits, loss = model(ids, mlm_labels=ids)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, cfg.vocab_size), ids.view(-1))
    aux = model.blocks[1].mlp.aux_loss
    assert aux.item() > 0
    torch.testing.assert_close(loss, ce + aux)
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg


def test_shared_switch_block_adds_its_aux_loss_once_per_layer():
    cfg = encoder_config("albert", "tiny", moe=SwitchConfig(num_experts=2, alpha=1.0))
    model = Encoder(cfg)
    ids = random_samples(2, 32)
    model(ids, mlm_labels=ids)
    per_layer = model._aux_losses
    assert len(per_layer) == cfg.n_layers and len({round(float(a.detach()), 7) for a in per_layer}) > 1
    torch.testing.assert_close(model.aux_loss(), sum(per_layer))


def test_albert_sharing_and_factorization_reduce_params_as_expected():
    bert = encoder_config("bert", "tiny")
    d, L, E = bert.d_model, bert.n_layers, ALBERT_EMBEDDING_DIM["tiny"]
    V, T, tv = bert.vocab_size, bert.seq_len, bert.type_vocab_size
    block = 4 * (d * d + d) + (2 * d * bert.d_ff + bert.d_ff + d) + 4 * d

    shared = encoder_config("bert", "tiny", share_layers=True)
    assert param_counts(bert)["total"] - param_counts(shared)["total"] == (L - 1) * block

    factorized = encoder_config("bert", "tiny", embedding_dim=E)
    # tables (V+T+tv) x d -> x E, embedding LayerNorm and MLM-head dense/LayerNorm d -> E, plus the E->d projection
    saved = (V + T + tv) * (d - E) + 2 * (d - E) + (d * d + d - d * E - E) + 2 * (d - E) - (E * d + d)
    assert param_counts(bert)["total"] - param_counts(factorized)["total"] == saved
    assert saved > 0

    albert = encoder_config("albert", "tiny")
    assert albert.share_layers and albert.embedding_dim == E
    model = Encoder(albert)
    assert n_params(model) == param_counts(bert)["total"] - (L - 1) * block - saved
    assert len(model.blocks) == 1 and all(model.block_for(i) is model.blocks[0] for i in range(L))
    assert model.embeddings.word.weight.shape == (V, E)
    # the MLM decoder is the word table itself: one (V, E) tensor in the whole state dict
    assert [k for k, v in model.state_dict().items() if v.shape == (V, E)] == ["embeddings.word.weight"]


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="embedding_dim"):
        encoder_config("albert", "tiny", embedding_dim=1000)
    with pytest.raises(ValueError, match="moe.every"):
        encoder_config("albert", "tiny", moe=SwitchConfig(every=2))
    with pytest.raises(ValueError, match="family"):
        encoder_config("electra", "tiny")
    assert set(PRESETS) == {"tiny", "small", "base"}


# ----------------------------------------------------------------------------- behaviour


def test_roberta_has_no_segments_and_no_nsp():
    model = Encoder(encoder_config("roberta", "tiny"))
    assert model.embeddings.token_type is None and model.nsp_head is None
    ids = random_samples(2, 16)
    with pytest.raises(ValueError, match="type_vocab_size=0"):
        model(ids, token_type_ids=torch.ones_like(ids))


def test_padding_does_not_change_real_tokens():
    model = Encoder(encoder_config("bert", "tiny", dropout=0.0)).eval()
    ids = random_samples(1, 20)[:, :16]
    padded = torch.cat([ids, torch.full((1, 6), TOK.pad_id)], dim=1)
    mask = torch.cat([torch.ones(1, 16), torch.zeros(1, 6)], dim=1).long()
    with torch.no_grad():
        a = model(ids)[0]
        b = model(padded, attention_mask=mask)[0][:, :16]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_matches_huggingface_bert_with_the_same_weights():
    transformers = pytest.importorskip("transformers")
    cfg = encoder_config("bert", "tiny", dropout=0.0, n_layers=2)
    hf = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff, max_position_embeddings=cfg.seq_len,
        type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).eval()
    ours = Encoder(cfg).eval()
    names = {"embeddings.word": "bert.embeddings.word_embeddings", "embeddings.position":
             "bert.embeddings.position_embeddings", "embeddings.token_type": "bert.embeddings.token_type_embeddings",
             "embeddings.norm": "bert.embeddings.LayerNorm", "nsp_head.pooler": "bert.pooler.dense",
             "nsp_head.classifier": "cls.seq_relationship", "mlm_head.dense": "cls.predictions.transform.dense",
             "mlm_head.norm": "cls.predictions.transform.LayerNorm"}
    for i in range(cfg.n_layers):
        hf_layer = f"bert.encoder.layer.{i}"
        names.update({f"blocks.{i}.attn.q_proj": f"{hf_layer}.attention.self.query",
                      f"blocks.{i}.attn.k_proj": f"{hf_layer}.attention.self.key",
                      f"blocks.{i}.attn.v_proj": f"{hf_layer}.attention.self.value",
                      f"blocks.{i}.attn.o_proj": f"{hf_layer}.attention.output.dense",
                      f"blocks.{i}.norm1": f"{hf_layer}.attention.output.LayerNorm",
                      f"blocks.{i}.mlp.up": f"{hf_layer}.intermediate.dense",
                      f"blocks.{i}.mlp.down": f"{hf_layer}.output.dense",
                      f"blocks.{i}.norm2": f"{hf_layer}.output.LayerNorm"})
    hf_state = hf.state_dict()
    state = {}
    for ours_name, hf_name in names.items():
        for leaf in ("weight", "bias"):
            if f"{hf_name}.{leaf}" in hf_state:
                state[f"{ours_name}.{leaf}"] = hf_state[f"{hf_name}.{leaf}"]
    state["mlm_head.bias"] = hf_state["cls.predictions.bias"]
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not missing and not unexpected

    ids = random_samples(2, 24)
    types = (torch.arange(24) > 12).long().expand(2, 24)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, -6:] = 0
    with torch.no_grad():
        out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        h = ours.hidden(ids, types, mask)
        logits = ours.mlm_logits(h)
        nsp = ours.nsp_logits(h)
    torch.testing.assert_close(logits, out.prediction_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(nsp, out.seq_relationship_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_a_few_steps_reduce_mlm_loss(family):
    torch.manual_seed(0)
    cfg = encoder_config(family, "tiny", seq_len=64, dropout=0.0)
    model = Encoder(cfg)
    masker = Masker.for_tokenizer(masking_config(family), TOK)
    pairs = SentencePairs(docstring_documents(), TOK.cls_id, TOK.sep_id, max_len=64)

    def make_batch(step: int, B: int = 16):
        indices = [(step * B + b) % len(pairs) for b in range(B)]
        batch = pad_pairs([pairs.nsp(i) for i in indices], TOK.pad_id, length=64)
        inputs, labels = masker.mask_batch(batch["input_ids"], indices, epoch=step * B // len(pairs))
        types = batch["token_type_ids"] if cfg.type_vocab_size else None
        return dict(input_ids=inputs, token_type_ids=types, attention_mask=batch["attention_mask"],
                    mlm_labels=labels, nsp_labels=batch["labels"] if cfg.nsp else None)

    held_out = make_batch(10_000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.eval()
    with torch.no_grad():
        before = model(**held_out)[1].item()
    model.train()
    for step in range(30):
        _, loss = model(**make_batch(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(**held_out)[1].item()
    assert after < before - 1.0, (before, after)                       # ln(320) = 5.8 -> well below

"""Text workloads: the bundled datasets and a user's CSV, tokenization cached on disk, MiniLM
loaded offline and cut into blocks, and a tiny random BERT trained and frozen over gRPC."""
from __future__ import annotations

import itertools
import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from freeze.engines import EngineSpec
from freezeps.config import load_config
from freezeps.roles import worker_settings as worker_settings_from_config
from ps.policy import FreezePolicy
from tests.conftest import run_workers, running_ps, worker_settings
from worker.client import ShardedClient
from worker.data import load_dataset, make_batch
from worker.flat import FlatModel
from worker.models import build_model, text_model_folder
from worker.text import TextSettings, reuters_r8, rotten_tomatoes, tokenize, transformers_api
from worker.train import run_worker

MINILM = text_model_folder("minilm", "pretrained")


@pytest.mark.parametrize("loader,train,rows,names", [
    (rotten_tomatoes, True, 11527, ["rotten", "fresh"]), (rotten_tomatoes, False, 1281, ["rotten", "fresh"]),
    (reuters_r8, True, 5485, ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]),
    (reuters_r8, False, 2189, ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"])])
def test_bundled_datasets_read_offline(loader, train, rows, names):
    texts, labels, got_names = loader(train)
    assert len(texts) == len(labels) == rows and got_names == names
    assert set(labels) == set(range(len(names))) and all(isinstance(t, str) and t for t in texts)


def test_rotten_tomatoes_split_is_fixed_and_disjoint():
    train, _, _ = rotten_tomatoes(True)
    test, _, _ = rotten_tomatoes(False)
    assert len(train) + len(test) == 7403 + 5405  # fresh + rotten; the plot rows are dropped
    assert rotten_tomatoes(False)[0] == test


def test_csv_loader_and_its_errors(tmp_path):
    path = tmp_path / "reviews.tsv"
    rows = [f"good film number {i}\tpos" if i % 3 else f"bad film number {i}\tneg" for i in range(50)]
    path.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    settings = TextSettings(MINILM, max_len=12, data_file=str(path))
    train = load_dataset("csv", tmp_path, True, text=settings)
    test = load_dataset("csv", tmp_path, False, text=settings)
    assert len(train) == 45 and len(test) == 5 and train.num_classes == 2
    assert train.inputs.shape == (45, 12) and train.inputs.dtype == torch.int64
    x, y = make_batch(train, np.arange(4), 32, 3, augment=False)
    assert torch.equal(x, train.inputs[:4]) and torch.equal(y, train.labels[:4])
    with pytest.raises(ValueError, match="no column 'review'"):
        load_dataset("csv", tmp_path, True, text=TextSettings(MINILM, data_file=str(path), text_column="review"))
    with pytest.raises(ValueError, match="needs data_file"):
        load_dataset("csv", tmp_path, True, text=TextSettings(MINILM))
    # MiniLM has 512 positions: a longer sequence would fail at the first long text's forward
    with pytest.raises(ValueError, match=r"max_seq_len 513: .* at most 512 tokens \(max_position_embeddings\)"):
        load_dataset("csv", tmp_path, True, text=TextSettings(MINILM, max_len=513, data_file=str(path)))
    assert load_dataset("csv", tmp_path, True, text=TextSettings(MINILM, max_len=512, data_file=str(path))
                        ).inputs.shape == (45, 512)


def test_tokenization_is_cached_on_disk(tmp_path, monkeypatch):
    texts = ["a fine film", "not good at all, sadly"]
    ids, digest = tokenize(texts, MINILM, 8, tmp_path)
    assert ids.shape == (2, 8) and ids[0, 0] == 101 and (ids[0] == 0).sum() == 8 - 5  # [CLS] a fine film [SEP]
    assert (tmp_path / f"{digest[:32]}.pt").is_file()
    assert tokenize(texts, MINILM, 9, tmp_path)[1] != digest  # another length is another entry
    import transformers
    monkeypatch.setattr(transformers, "AutoTokenizer", None)  # a second tokenization would fail
    again, same = tokenize(texts, MINILM, 8, tmp_path)
    assert torch.equal(again, ids) and same == digest


def test_minilm_loads_offline_and_its_blocks_cover_every_parameter_once():
    import transformers
    model = build_model("minilm", 2, "pretrained")
    # Built to train (from_pretrained returns eval mode): dropout on from the first step.
    assert all(m.training for m in model.modules())
    assert model.block_names == ["embeddings", *[f"layer{i}" for i in range(6)], "head"]
    params = [p for block in model.blocks for p in block.parameters()]
    assert len({id(p) for p in params}) == len(params) == len(list(model.parameters()))
    sizes = [sum(p.numel() for p in block.parameters()) for block in model.blocks]
    assert sizes[0] == 11_918_592 and sizes[1:7] == [1_774_464] * 6  # REFERENCE: embeddings 11.9M, layers 1.77M
    # The pretrained encoder was loaded, and the blocks compute what the original network does.
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(str(MINILM), num_labels=2)
    reference.classifier.load_state_dict(model.blocks[-1].classifier.state_dict())
    assert torch.equal(reference.bert.embeddings.word_embeddings.weight,
                       model.blocks[0].embeddings.word_embeddings.weight)
    ids = tokenize(["a fine film", "a long and tedious one, not worth it"], MINILM, 16, None)[0]
    model.eval()
    reference.eval()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=(ids != 0).long()).logits
        assert torch.allclose(model(ids), want, atol=1e-5)


def test_mean_pooling_head_classifies_the_mean_of_the_real_tokens():
    """text_pooling mean: the head is dropout and the classifier on the mean of the last hidden
    states over the non-padding tokens (sentence-transformers' pooling); the checkpoint's pooler
    is left out, so the blocks still cover every parameter once, and padding changes nothing."""
    import transformers
    model = build_model("minilm", 2, "pretrained", text_pooling="mean")
    cls_model = build_model("minilm", 2, "pretrained")
    params = [p for block in model.blocks for p in block.parameters()]
    assert len({id(p) for p in params}) == len(params) == len(list(model.parameters()))
    pooler = sum(p.numel() for p in cls_model.blocks[-1].pooler.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in cls_model.parameters()) - pooler
    assert [n for n, _ in model.blocks[-1].named_parameters()] == ["classifier.weight", "classifier.bias"]
    encoder = transformers.AutoModel.from_pretrained(str(MINILM)).eval()
    model.eval()
    texts = ["a fine film", "a long and tedious one, not worth it"]
    ids = tokenize(texts, MINILM, 16, None)[0]
    with torch.no_grad():
        hidden = encoder(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        keep = (ids != 0).unsqueeze(-1).float()
        want = model.blocks[-1].classifier((hidden * keep).sum(1) / keep.sum(1))
        assert torch.allclose(model(ids), want, atol=1e-5)
        assert torch.allclose(model(tokenize(texts, MINILM, 24, None)[0]), want, atol=1e-5)
        assert not torch.allclose(cls_model.eval()(ids), want, atol=1e-3)


def test_frozen_blocks_keep_dropout_only_when_asked():
    """A frozen prefix runs in eval mode by default: no dropout, so a sample's output is the same
    every time (what the activation cache needs). With frozen_dropout its blocks draw dropout
    masks, attention's included, as before their freeze; evaluation still turns them off."""
    ids = tokenize(["a fine film", "a long and tedious one, not worth it"], MINILM, 16, None)[0]
    for frozen_dropout in (False, True):
        model = build_model("minilm", 2, "pretrained", frozen_dropout=frozen_dropout)
        model.set_frozen(3)
        assert all(m.training == frozen_dropout for block in model.blocks[:3] for m in block.modules())
        assert all(m.training for m in model.blocks[3].modules())
        assert torch.equal(model.prefix(ids), model.prefix(ids)) != frozen_dropout
        model.eval()
        assert torch.equal(model.prefix(ids), model.prefix(ids))


def test_text_settings_are_checked():
    with pytest.raises(ValueError, match="a text model needs a text dataset"):
        load_config({"model": "minilm", "dataset": "fashion_mnist"}, environ={})
    with pytest.raises(ValueError, match="a text model needs a text dataset"):
        load_config({"dataset": "rotten_tomatoes"}, environ={})  # the default model is a vision one
    with pytest.raises(ValueError, match="text model"):
        build_model("minilm", 2, "imagenet")
    with pytest.raises(ValueError, match="Hugging Face folder"):
        build_model("bert", 2, "random")
    with pytest.raises(ValueError, match="text_pooling 'mean': model resnet18 is not a text model"):
        load_config({"model": "resnet18", "text_pooling": "mean"}, environ={})
    with pytest.raises(ValueError, match=r"text_pooling: 'max' is not one of \['cls', 'mean'\]"):
        load_config({"model": "minilm", "dataset": "rotten_tomatoes", "text_pooling": "max"}, environ={})
    with pytest.raises(ValueError, match="resnet18 is not a text model"):
        build_model("resnet18", 2, "random", text_pooling="mean")
    mean = load_config({"model": "minilm", "weights": "pretrained", "dataset": "rotten_tomatoes",
                        "text_pooling": "mean"}, environ={})
    assert worker_settings_from_config(mean).text_pooling == "mean"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A two-layer BERT with MiniLM's tokenizer and (saved) random weights."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MINILM / name, folder / name)
    config = json.loads((MINILM / "config.json").read_text())
    config.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64,
                  # Dropout draws from torch's RNG, which worker threads share in their own
                  # order: without it two runs are comparable.
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    # Saved random weights: workers run as threads that share torch's RNG, so a folder
    # without weights would start two runs from different values.
    hf = transformers_api()
    torch.manual_seed(0)
    hf.AutoModelForSequenceClassification.from_config(
        hf.AutoConfig.from_pretrained(str(folder), num_labels=2)).save_pretrained(folder)
    return folder


def test_a_text_batch_reads_the_rows_of_its_tokens_and_of_its_positions(tiny_bert):
    """What a sparse pull asks of the embedding matrices: the word embeddings' rows of the
    batch's token ids, the position embeddings' rows of its positions (the token-type
    embeddings, two rows, come whole)."""
    model = build_model("bert", 2, str(tiny_bert))
    reads = model.rows_read(torch.tensor([[101, 7, 7, 102, 0], [101, 9, 102, 0, 0]]))
    assert {name: rows.tolist() for name, rows in reads.items()} == {
        "embeddings/embeddings.word_embeddings.weight": [0, 7, 9, 101, 102],
        "embeddings/embeddings.position_embeddings.weight": [0, 1, 2, 3, 4]}
    row_sparse = {t.name for t in FlatModel(model, sparse_pull=True).layout[0].tensors if t.row_sparse}
    assert set(reads) <= row_sparse  # what a pull may ask rows of


@pytest.fixture(scope="module")
def tiny_bert_runs(tmp_path_factory, tiny_bert):
    """The same two-worker run, 6 steps, evaluated before steps 2 and 4, with the embeddings and
    layer0 frozen from step 3: dense and row-sparse embedding pushes in float32 and bfloat16
    with whole pulls, keyed (sparse_push, push_dtype); and row-sparse pushes with whole and with
    row-sparse pulls, float32 both ways or bfloat16 both ways, keyed (sparse_push, push_dtype,
    sparse_pull, pull_dtype); the last of those with pushes that start after backward and
    forwards that start after the whole pull, keyed with "no overlap" added. Each: (run log records by step, final values, each rank's test
    samples wrong at each evaluation)."""
    runs = {}
    keys = [*itertools.product((False, True), ("float32", "bfloat16"), (False,), ("float32",), (True,)),
            (True, "float32", True, "float32", True), (True, "bfloat16", False, "bfloat16", True),
            (True, "bfloat16", True, "bfloat16", True), (True, "bfloat16", True, "bfloat16", False)]
    for sparse, push_dtype, sparse_pull, pull_dtype, overlap in keys:
        tmp_path = tmp_path_factory.mktemp(f"tiny-bert-run-{sparse}-{push_dtype}-{sparse_pull}-{pull_dtype}-{overlap}")
        policy = FreezePolicy(EngineSpec("static", blocks=2, from_step=3))  # embeddings and layer0 from step 3
        log = tmp_path / "ps.jsonl"
        with running_ps(num_workers=2, policy=policy, log_path=log, push_dtype=push_dtype,
                        pull_dtype=pull_dtype) as ps:
            summaries = run_workers([worker_settings(
                ps.address, model="bert", weights=str(tiny_bert), dataset="rotten_tomatoes", train_samples=256,
                steps=6, batch_size=8, data_dir=tmp_path, text=TextSettings(tiny_bert, max_len=16),
                evaluate=True, eval_every=2, test_samples=32, sparse_push=sparse, sparse_pull=sparse_pull,
                overlap_push=overlap, overlap_pull=overlap) for _ in range(2)])
            values = ps.server.values_by_name()
        assert all(s["steps"] == 6 for s in summaries)
        records = [json.loads(line) for line in log.read_text().splitlines()]
        key = (sparse, push_dtype) if not sparse_pull and pull_dtype == "float32" else \
            (sparse, push_dtype, sparse_pull, pull_dtype)
        if not overlap:
            key += ("no overlap",)
        runs[key] = ({r["step"]: r for r in records if r["event"] == "round"}, values,
                     {s["rank"]: [e["wrong"] for e in s["evals"]] for s in summaries})
    return runs


def _payload(rounds, step, method, direction, block=None):
    by_block = rounds[step]["bytes"]["by_block"][method][direction]
    return sum(v["payload"] for k, v in by_block.items() if k != "-1" and (block is None or k == str(block)))


def test_tiny_bert_trains_over_grpc_and_freezing_cuts_exactly_its_blocks(tiny_bert_runs, tiny_bert):
    rounds, _, _ = tiny_bert_runs[False, "float32"]
    layout = FlatModel(build_model("bert", 2, str(tiny_bert))).layout
    sizes = {b.name: b.nbytes for b in layout}
    assert list(sizes) == ["embeddings", "layer0", "layer1", "head"]
    frozen = sizes["embeddings"] + sizes["layer0"]
    assert _payload(rounds, 1, "Push", "in") - _payload(rounds, 4, "Push", "in") == 2 * frozen  # two workers
    assert _payload(rounds, 1, "Pull", "out") - _payload(rounds, 4, "Pull", "out") == 2 * frozen
    assert _payload(rounds, 4, "Push", "in") == 2 * (sizes["layer1"] + sizes["head"])


def test_sparse_embedding_push_trains_the_same_for_fewer_bytes(tiny_bert_runs, tiny_bert):
    """Row-sparse pushes of the embedding matrices: the same parameters as dense pushes, and
    the embeddings block's push is the rows that changed (here under a third of the dense
    bytes: 2x8 samples of 16 tokens touch a few dozen of 30,522 vocabulary rows); the other
    blocks and every pull are as dense."""
    (dense, dense_values, _), (sparse, sparse_values, _) = tiny_bert_runs[False, "float32"], tiny_bert_runs[True, "float32"]
    for name in dense_values:
        np.testing.assert_array_equal(sparse_values[name], dense_values[name], err_msg=name)
    embeddings = FlatModel(build_model("bert", 2, str(tiny_bert))).layout[0].nbytes
    for step in range(3):
        assert _payload(dense, step, "Push", "in", 0) == 2 * embeddings
        assert 0 < _payload(sparse, step, "Push", "in", 0) < 2 * embeddings / 3
        for block in (1, 2, 3):
            assert _payload(sparse, step, "Push", "in", block) == _payload(dense, step, "Push", "in", block)
    for step in range(6):
        assert _payload(sparse, step, "Pull", "out") == _payload(dense, step, "Pull", "out")
        if step >= 3:  # frozen: no embeddings at all
            assert _payload(sparse, step, "Push", "in") == _payload(dense, step, "Push", "in")


def test_bfloat16_pushes_halve_every_block_and_train_alike_dense_or_sparse(tiny_bert_runs, tiny_bert):
    """bfloat16 pushes: each dense block's push is half the float32 one, embedding rows cost
    half their values plus their indices, pulls are as in float32; dense and row-sparse bfloat16
    pushes train to the same bits, and not to float32's (the rounding is real)."""
    (dense, dense_values, _), (sparse, sparse_values, _) = (tiny_bert_runs[False, "bfloat16"],
                                                            tiny_bert_runs[True, "bfloat16"])
    wide, wide_sparse = tiny_bert_runs[False, "float32"][0], tiny_bert_runs[True, "float32"][0]
    for name in dense_values:
        np.testing.assert_array_equal(sparse_values[name], dense_values[name], err_msg=name)
    wide_values = tiny_bert_runs[False, "float32"][1]
    assert any(not np.array_equal(dense_values[n], wide_values[n]) for n in wide_values)
    for step in range(6):
        for block in range(0 if step < 3 else 2, 4):
            assert 2 * _payload(dense, step, "Push", "in", block) == _payload(wide, step, "Push", "in", block)
        assert _payload(dense, step, "Pull", "out") == _payload(wide, step, "Pull", "out")
    for step in range(3):  # the same rows (the same tokens): values halve, their 4-byte indices do not
        narrow_rows, wide_rows = _payload(sparse, step, "Push", "in", 0), _payload(wide_sparse, step, "Push", "in", 0)
        assert wide_rows / 2 < narrow_rows < wide_rows


def test_sparse_pulls_train_to_the_same_bits_for_fewer_bytes(tiny_bert_runs, tiny_bert):
    """Pulls that carry of the word embeddings only the rows the next batch reads: the same
    parameters to the bit, and the same test samples wrong, as whole pulls (a row left stale
    would change a forward), in float32 and with bfloat16 pull changes; the embeddings block's
    pull is under a third of its bytes. An evaluation's pull (before steps 2 and 4) is whole,
    and so is the freeze's (step 3), whatever rows were asked; with bfloat16 changes the pull
    after rows is whole float32 for every block (the worker's held copy of the embeddings is
    stale), and the next pull takes changes again."""
    layout = FlatModel(build_model("bert", 2, str(tiny_bert))).layout
    for dtype in ("float32", "bfloat16"):
        whole_pulls = (True, dtype) if dtype == "float32" else (True, dtype, False, dtype)
        dense, dense_values, dense_wrong = tiny_bert_runs[whole_pulls]
        sparse, sparse_values, sparse_wrong = tiny_bert_runs[True, dtype, True, dtype]
        for name in dense_values:
            np.testing.assert_array_equal(sparse_values[name], dense_values[name], err_msg=(dtype, name))
        assert sparse_wrong == dense_wrong and len(sparse_wrong[0]) == 3  # by rank: steps 2, 4 and the end
        for step in (0, 1):
            assert 0 < _payload(sparse, step, "Pull", "out", 0) < 2 * layout[0].nbytes / 3, (dtype, step)
        assert _payload(sparse, 3, "Pull", "out", 0) == _payload(dense, 3, "Pull", "out", 0) == 2 * layout[0].nbytes
        for step in (1, 3, 4, 5):
            for block in range(1 if step < 3 else 2, 4):
                assert _payload(sparse, step, "Pull", "out", block) == _payload(dense, step, "Pull", "out", block)
        whole = sum(layout[b].nbytes for b in range(4))
        assert _payload(sparse, 2, "Pull", "out") == 2 * whole  # evaluating: every block whole, in float32
        if dtype == "bfloat16":  # the dense run's evaluation pull is changes: half the bytes
            assert _payload(dense, 2, "Pull", "out") < _payload(sparse, 2, "Pull", "out")
    float32_values = tiny_bert_runs[True, "float32", True, "float32"][1]
    assert any(not np.array_equal(float32_values[n], sparse_values[n]) for n in sparse_values)  # bfloat16 is real


def test_pushes_and_pulls_that_overlap_compute_train_to_the_same_bits(tiny_bert_runs):
    """Each block pushed as soon as backward has finished it and run forward as soon as its pull
    has landed (the defaults) against pushes that start after backward and forwards after the
    whole pull: the same parameters to the bit, the same test samples wrong, and the same bytes
    of every block at every round (row-sparse pushes and pulls, bfloat16 both ways, a freeze at
    step 3, evaluations every 2 steps)."""
    overlapped, overlapped_values, overlapped_wrong = tiny_bert_runs[True, "bfloat16", True, "bfloat16"]
    after, after_values, after_wrong = tiny_bert_runs[True, "bfloat16", True, "bfloat16", "no overlap"]
    for name in after_values:
        np.testing.assert_array_equal(overlapped_values[name], after_values[name], err_msg=name)
    assert overlapped_wrong == after_wrong
    for step in range(6):
        for block in range(0 if step < 3 else 2, 4):
            for method, direction in (("Push", "in"), ("Pull", "out")):
                assert _payload(overlapped, step, method, direction, block) == \
                    _payload(after, step, method, direction, block) > 0, (step, block, method)


def test_two_shards_with_sparse_pulls_train_as_one_ps(tiny_bert_runs, tiny_bert, ps_factory, tmp_path):
    """Sparse pulls from two PS shards (the embeddings on one, the rest on the other; each asked
    only for rows of the blocks it owns), bfloat16 both ways: the same bits as one PS."""
    policy = FreezePolicy(EngineSpec("static", blocks=2, from_step=3))
    wire = dict(push_dtype="bfloat16", pull_dtype="bfloat16")
    with ps_factory(2, policy=policy, shard=0, num_shards=2, **wire) as s0, \
            ps_factory(2, policy=policy, shard=1, num_shards=2, **wire) as s1:
        run_workers([worker_settings(
            (s0.address, s1.address), model="bert", weights=str(tiny_bert), dataset="rotten_tomatoes",
            train_samples=256, steps=6, batch_size=8, data_dir=tmp_path, text=TextSettings(tiny_bert, max_len=16),
            evaluate=True, eval_every=2, test_samples=32, sparse_push=True, sparse_pull=True) for _ in range(2)])
        assert s0.server.describe()["owned"][0] == 0 and s1.server.describe()["owned"][0] > 0
        values = {**s0.server.values_by_name(), **s1.server.values_by_name()}
    want = tiny_bert_runs[True, "bfloat16", True, "bfloat16"][1]
    assert values.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(values[name], want[name], err_msg=name)


class _LatePuller(ShardedClient):
    """Makes its first pull of a step at or past `late_at` only once the run is two rounds past
    that step (backup workers go on without it; which step it is depends on timing: a late push
    skips this worker ahead), and records every pull: (step asked, rows asked, step pulled)."""

    def __init__(self, address: str, server, late_at: int):
        super().__init__((address,), connect_retries=3, rpc_timeout_s=30.0)
        self.server, self.late_at, self.pulls = server, late_at, []
        self.delayed: int | None = None  # the step whose pull it held back

    def open_pull(self, step, frozen_blocks, flat, rows=(), landing=None):
        if self.delayed is None and step >= self.late_at:
            self.delayed = step
            deadline = time.monotonic() + 30
            while self.server.step < step + 2 and time.monotonic() < deadline:
                time.sleep(0.02)
        pulling = super().open_pull(step, frozen_blocks, flat, rows, landing)
        self.pulls.append((step, [r.rows for r in rows], pulling.header.step))
        return pulling


def test_a_pull_that_finds_the_run_ahead_asks_again_for_its_new_batchs_rows(tiny_bert, tmp_path):
    """With backup workers a worker's pull may come back with a later step than it asked for
    (the rounds went on without it): the rows it asked were its batch's at the step it asked
    for, so it pulls again, asking for the rows of the batch it goes on with."""
    with running_ps(num_workers=3, backup_workers=1, worker_timeout_s=60.0) as ps:
        settings = worker_settings(ps.address, model="bert", weights=str(tiny_bert), dataset="rotten_tomatoes",
                                   train_samples=384, steps=16, batch_size=8, data_dir=tmp_path,
                                   text=TextSettings(tiny_bert, max_len=16), sparse_pull=True)
        late = _LatePuller(ps.address, ps.server, late_at=3)
        result = {}
        thread = threading.Thread(target=lambda: result.update(summary=run_worker(settings, late)), daemon=True)
        thread.start()
        run_workers([settings, settings])
        thread.join(60)
    assert "summary" in result and late.delayed is not None  # it ran to the end, holding one pull back
    held = next(p for p in late.pulls if p[0] == late.delayed)
    asked, rows, pulled = held
    assert pulled >= asked + 2 and rows  # the run had gone on: rows of another step's batch, asked in vain
    again = late.pulls[late.pulls.index(held) + 1]
    # (the run may have gone on again meanwhile: the two others make rounds of their own)
    assert again[0] == pulled and again[2] >= pulled and again[1] and again[1] != rows


def test_host_staging_pushes_the_same_embedding_rows(tiny_bert):
    """Row-sparse pushes read the gradients' host copy (the GPU path's): with it apart from the
    model's buffers they are the same rows and bytes, dense or in bfloat16."""
    batch = torch.randint(1000, 2000, (4, 16))
    flats = [FlatModel(build_model("bert", 2, str(tiny_bert)), sparse_push=True, host_staging=staging)
             for staging in (False, True)]
    for dtype in ("float32", "bfloat16"):
        for flat in flats:
            flat.set_push_dtype(dtype)
            flat.zero_grads(0)
            torch.nn.functional.cross_entropy(flat.model(batch), torch.tensor([0, 1, 0, 1])).backward()
        plain, staged = flats
        for b in range(len(plain.layout)):
            np.testing.assert_array_equal(staged.push_bytes(b), plain.push_bytes(b))
            rows = (staged.push_rows(b), plain.push_rows(b))
            assert rows[0].keys() == rows[1].keys() and (b != 0 or rows[0])
            for t in rows[1]:
                for got, want in zip(rows[0][t], rows[1][t]):
                    np.testing.assert_array_equal(got, want)

"""prepare.py: tokenizer, loader, metric, resume and bad input. Real tokenizer, real files, real torch."""

import importlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.hf_mirror import Mirror  # noqa: E402


def run_prepare(cache, *args, smoke=True, env=None):
    e = {**os.environ, "AUTORESEARCH_CACHE": str(cache), "AUTORESEARCH_SMOKE": "1" if smoke else "0", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *args], env=e,
                          capture_output=True, text=True, timeout=300)


def load_prepare(cache, smoke=True):
    """Import prepare.py with its constants resolved for this cache and profile."""
    os.environ["AUTORESEARCH_CACHE"] = str(cache)
    os.environ["AUTORESEARCH_SMOKE"] = "1" if smoke else "0"
    import prepare
    return importlib.reload(prepare)


def words_corpus(n_docs, seed, marker=""):
    """Synthetic documents of pseudo-words (enough variety for a 1024-token BPE)."""
    rng = random.Random(seed)
    lexicon = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    docs = []
    for d in range(n_docs):
        words = [rng.choice(lexicon) for _ in range(rng.randint(20, 400))]
        docs.append(f"{marker}{d:05d} " + " ".join(words) + f". Number {rng.randint(0, 99999)}!")
    return docs


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One prepared smoke cache (Python's stdlib corpus), shared by the read-only tests."""
    cache = tmp_path_factory.mktemp("cache")
    r = run_prepare(cache)
    assert r.returncode == 0, r.stderr
    saved = {k: os.environ.get(k) for k in ("AUTORESEARCH_CACHE", "AUTORESEARCH_SMOKE")}
    P = load_prepare(cache)
    yield P
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


# --- tokenizer ---------------------------------------------------------------

def test_tokenizer_round_trip_and_specials(smoke):
    tok = smoke.Tokenizer.from_directory()
    assert tok.get_vocab_size() == smoke.VOCAB_SIZE == 1024
    assert tok.get_bos_token_id() == smoke.VOCAB_SIZE - 4
    for text in ["Hello world!", "naïve café 你好 🙂 \x00 tabs\tand\nnewlines", "x = 12345678 ** 2", ""]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(["ab", "cd"], prepend=tok.get_bos_token_id())
    assert all(row[0] == tok.get_bos_token_id() for row in ids)
    # digits are split in groups of at most two before BPE
    assert all(len(tok.decode([t])) <= 2 for t in tok.encode("1234567890") if tok.decode([t]).isdigit())
    # plain files only: no pickle anywhere in the cache
    for dirpath, _, files in os.walk(smoke.CACHE_DIR):
        assert not any(f.endswith((".pkl", ".pt", ".pickle")) for f in files)


def test_token_bytes_are_raw_byte_lengths(smoke):
    tok = smoke.Tokenizer.from_directory()
    tb = smoke.get_token_bytes("cpu")
    assert tb.shape == (tok.get_vocab_size(),) and tb.dtype == torch.int32
    assert tb[tok.get_bos_token_id()] == 0 and (tb[-4:] == 0).all()
    for i in range(256):  # the single bytes: 1 each, including bytes that are not valid UTF-8 alone
        assert tb[tok.enc.encode_single_token(bytes([i]))] == 1
    partial = [i for i in range(tok.get_vocab_size() - 4) if tok.decode([i]).count("\ufffd") > 0]
    assert partial, "expected some tokens that are partial UTF-8 sequences"
    for i in partial:  # decoding would give 3 bytes per replacement character; the table must not
        assert tb[i] == len(tok.enc.decode_single_token_bytes(i))
    text = "héllo wörld 你好"
    assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))


# --- loader --------------------------------------------------------------------

def test_loader_rows(smoke):
    tok = smoke.Tokenizer.from_directory()
    bos = tok.get_bos_token_id()
    B, T = 8, 64
    loader = smoke.make_dataloader(tok, B, T, "train", device="cpu")
    for _ in range(20):
        x, y, epoch = next(loader)
        assert x.shape == (B, T) and y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == bos).all()                 # every row starts with BOS
        assert torch.equal(x[:, 1:], y[:, :-1])       # targets are inputs shifted by one
        assert ((x >= 0) & (x < tok.get_vocab_size())).all() and epoch >= 1


def test_packing_keeps_every_token(smoke):
    """Documents longer than a row are cut, and their remainders come back: over a few epochs every
    text token of the split appears, none twice within an epoch, and pieces keep their order."""
    bos = 60000
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 300, size=200)
    docs, v = [], 0
    for n in lengths:
        docs.append(np.concatenate([[bos], np.arange(v, v + n - 1)]).astype(np.uint16))
        v += n - 1
    total_text = v

    def stream():
        epoch = 1
        while True:
            for d in docs:
                yield d, 0, len(d), epoch
            epoch += 1

    rows = smoke._pack_rows(stream(), bos, 4, 127, buffer_size=16)
    seen, epochs = [], []
    while len(seen) < total_text + 4 * 128:
        packed, epoch = next(rows)
        epochs.append(epoch)
        assert packed.shape == (4, 128) and (packed[:, 0] == bos).all()
        for row in packed:
            seen.extend(row[row != bos].tolist())
    first = np.array(seen[:total_text])
    # the first epoch is every text token exactly once: nothing dropped, starved or read twice
    assert np.array_equal(np.sort(first), np.arange(total_text))
    assert epochs[0] == 1 and epochs[-1] == 2
    doc_of = np.searchsorted(np.cumsum(lengths - 1), first, side="right")
    for d in np.unique(doc_of):  # a document's pieces come out in order
        assert (np.diff(first[doc_of == d]) > 0).all()


def prepared_corpus(tmp_path, docs):
    """prepare.py --data on a jsonl file of these documents; the module, loaded for its cache."""
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cache = tmp_path / "cache"
    r = run_prepare(cache, "--data", str(src))
    assert r.returncode == 0, r.stderr
    return load_prepare(cache)


def test_train_and_val_never_mix(tmp_path):
    docs = words_corpus(400, seed=1, marker="doc")
    P = prepared_corpus(tmp_path, docs)
    tok = P.Tokenizer.from_directory()
    val_ids = {d[3:8] for d in docs if P.is_val_document(d)}
    train_ids = {d[3:8] for d in docs} - val_ids
    assert val_ids and train_ids
    for split, own in (("train", train_ids), ("val", val_ids)):
        text = ""
        loader = P._loader(tok, 8, 128, split, device="cpu")
        for _ in range(30):
            x, _, _ = next(loader)
            text += "".join(tok.decode(row.tolist()) for row in x)
        found = {m[:5] for m in text.split("doc")[1:] if m[:5].isdigit()}
        assert found and found <= own, f"{split} loader read documents of the other split"


def split_documents(P, split, bos):
    """Every document of a split, once, as token arrays (straight from its token files)."""
    ndocs, docs = P._documents(split, bos)
    return [a[start:start + n] for a, start, n, _ in (next(docs) for _ in range(ndocs))]


def test_the_heldout_split_shares_no_document_with_training_or_validation(tmp_path):
    docs = words_corpus(600, seed=4, marker="doc")
    docs += [docs[7], docs[8], docs[9]]  # exact duplicates land with their twins, never across
    P = prepared_corpus(tmp_path, docs)
    cache = tmp_path / "cache"
    tok = P.Tokenizer.from_directory()
    ids = {}
    for split in P.SPLITS:
        found = [tok.decode(a[1:].tolist()) for a in split_documents(P, split, tok.get_bos_token_id())]
        ids[split] = [d[3:8] for d in found]
        assert all(d.startswith("doc") for d in found)
    assert all(ids.values()) and sum(map(len, ids.values())) == len(docs)  # every document, in one split
    train, val, held = (set(ids[s]) for s in ("train", "val", "heldout"))
    assert not (train & val) and not (train & held) and not (val & held)
    assert held == {d[3:8] for d in docs if P.document_split(d) == "heldout"}
    assert len(docs) / 40 < len(ids["heldout"]) < len(docs) / 10  # about one document in 20
    m = json.loads((cache / "smoke" / "manifest.json").read_text())
    assert m["heldout_tokens"] == sum(a.size for a in split_documents(P, "heldout", tok.get_bos_token_id()))
    assert m["heldout_sha256"] == P.val_fingerprint("heldout") != m["val_sha256"]
    # a changed held-out file is refused like a changed validation file
    path = P.split_files("heldout")[0]
    st = os.stat(path)
    data = bytearray(open(path, "rb").read())
    data[5] ^= 1
    open(path, "wb").write(bytes(data))
    r = run_prepare(cache, "--check")
    assert r.returncode == 1 and "held-out tokens" in r.stderr
    data[5] ^= 1
    open(path, "wb").write(bytes(data))  # the module stays loaded on this cache for later tests
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_the_climbmix_heldout_shard_is_never_a_training_shard(smoke):
    P = smoke
    assert P.climbmix_training_shards(10) == list(range(10))
    every = P.climbmix_training_shards(P.MAX_SHARD)  # what --num-shards -1 asks for
    assert len(every) == P.MAX_SHARD - 1 == len(set(every))
    assert P.HELDOUT_SHARD == 6541 and P.VAL_SHARD == 6542
    assert P.HELDOUT_SHARD not in every and P.VAL_SHARD not in every
    assert P.climbmix_training_shards(10**6) == every


# --- the metric ------------------------------------------------------------------

class ConstantModel(torch.nn.Module):
    """Returns fixed logits for every position; it never sees the targets."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, idx, targets=None):
        assert targets is None
        return self.logits.expand(*idx.shape, -1)


def hand_bpb(P, tok, logits_row, split="val"):
    """The metric computed independently with numpy over the rows the evaluator scores."""
    tb = P.get_token_bytes().numpy()
    logp = logits_row.double().numpy() - np.log(np.exp(logits_row.double().numpy()).sum())
    nats = nbytes = counted = 0
    for rows in P._eval_rows(tok, split):
        y = rows[:, 1:].astype(np.int64).ravel()
        keep = tb[y] > 0
        nats += -logp[y[keep]].sum()
        nbytes += tb[y].sum()
        counted += keep.sum()
    return nats / (math.log(2) * nbytes), counted, nbytes


def test_evaluate_bpb_zero_logits_is_uniform(smoke):
    tok = smoke.Tokenizer.from_directory()
    V = tok.get_vocab_size()
    bpb = smoke.evaluate_bpb(ConstantModel(torch.zeros(V)), tok, batch_size=4)
    _, counted, nbytes = hand_bpb(smoke, tok, torch.zeros(V))
    assert counted > 0 and bpb == pytest.approx(math.log2(V) * counted / nbytes, rel=1e-6)  # fp32 cross-entropy


def test_evaluate_bpb_matches_hand_computation(smoke):
    tok = smoke.Tokenizer.from_directory()
    logits = torch.randn(tok.get_vocab_size(), generator=torch.Generator().manual_seed(0)) * 3
    bpb = smoke.evaluate_bpb(ConstantModel(logits), tok, batch_size=4)
    expected, _, _ = hand_bpb(smoke, tok, logits)
    assert bpb == pytest.approx(expected, rel=1e-6)


def test_the_evaluator_scores_the_heldout_split_too(smoke, tmp_path):
    tok = smoke.Tokenizer.from_directory()
    logits = torch.randn(tok.get_vocab_size(), generator=torch.Generator().manual_seed(1)) * 2
    smoke.handover(ConstantModel(logits), str(tmp_path / "h"))
    assert sorted(os.listdir(tmp_path / "h")) == ["model.bin", "model.json"]  # plain data, no pickle
    result = smoke.evaluate_handover(str(tmp_path / "h"))
    expected, _, _ = hand_bpb(smoke, tok, logits, "heldout")
    assert float(result["heldout_bpb"]) == pytest.approx(expected, abs=2e-6)
    assert float(result["val_bpb"]) == pytest.approx(hand_bpb(smoke, tok, logits)[0], abs=2e-6)
    assert abs(float(result["val_bpb"]) - expected) > 1e-4
    assert result["eval_tokens"] == smoke.EVAL_TOKENS and smoke.HELDOUT_TOKENS == smoke.EVAL_TOKENS // 4


def train_py_classes():
    """train.py's code up to its setup section, which starts training: its constants and classes."""
    src = open(os.path.join(ROOT, "train.py")).read()
    ns = {"__name__": "train_classes"}
    exec(compile(src[:src.index("t_start = time.time()")], "train.py", "exec"), ns)
    return ns


def smoke_gpt(smoke):
    """train.py's smoke model with random weights: its classes, built as train.py builds them."""
    ns = train_py_classes()
    tok = smoke.Tokenizer.from_directory()
    cfg = ns["GPTConfig"](sequence_len=smoke.MAX_SEQ_LEN, vocab_size=tok.get_vocab_size(), n_layer=ns["DEPTH"],
                          n_head=4, n_kv_head=4, n_embd=128, window_pattern=ns["WINDOW_PATTERN"])
    with torch.device("meta"):
        model = ns["GPT"](cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_the_metric_of_the_real_model_is_what_evaluating_in_process_gave(smoke, tmp_path):
    """Today's metric on train.py's own model, computed in this process as evaluate_bpb did before
    the hand-over (the model called on batches of train.py's smoke batch size), equals what the
    evaluator computes from the handed-over graph."""
    tok = smoke.Tokenizer.from_directory()
    model = smoke_gpt(smoke)
    nbytes = smoke.get_token_bytes()
    nats, total = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
    rows = smoke._packed("val", tok.get_bos_token_id(), 8, smoke.MAX_SEQ_LEN)
    with torch.no_grad():
        for _ in range(smoke.EVAL_TOKENS // (8 * smoke.MAX_SEQ_LEN)):
            batch = torch.from_numpy(next(rows)[0].astype(np.int64))
            y = batch[:, 1:].reshape(-1)
            n = torch.nn.functional.cross_entropy(model(batch[:, :-1]).reshape(y.numel(), -1).float(), y, reduction="none")
            nats += (n * (nbytes[y] > 0)).sum(dtype=torch.float64)
            total += nbytes[y].sum()
    before = (nats / (math.log(2) * total.double())).item()
    smoke.handover(model, str(tmp_path / "h"))
    after = float(smoke.evaluate_handover(str(tmp_path / "h"), heldout=False)["val_bpb"])
    assert after == pytest.approx(before, abs=1e-6) and 2 < after < 20


class FlexModel(torch.nn.Module):
    """Sliding-window FlexAttention with a block mask, as train.py uses on a GPU."""

    def __init__(self, V, T):
        super().__init__()
        from torch.nn.attention.flex_attention import create_block_mask
        self.emb, self.out = torch.nn.Embedding(V, 64), torch.nn.Linear(64, V, bias=False)
        self.mask = create_block_mask(lambda b, h, q, k: (k <= q) & (q - k <= T // 2), None, None, T, T, device="cpu")

    def forward(self, x):
        from torch.nn.attention.flex_attention import flex_attention
        h = self.emb(x).view(x.size(0), x.size(1), 4, 16).transpose(1, 2)
        y = flex_attention(h, h.flip(-1), h * 0.5, block_mask=self.mask).transpose(1, 2).reshape(x.size(0), x.size(1), 64)
        return self.out(y).float()


def test_flex_attention_crosses_over_and_scores_as_in_process(smoke, tmp_path):
    tok = smoke.Tokenizer.from_directory()
    torch.manual_seed(0)
    model = FlexModel(tok.get_vocab_size(), smoke.MAX_SEQ_LEN).eval()
    smoke.handover(model, str(tmp_path / "h"))
    forward, _ = smoke.load_handover(str(tmp_path / "h"), torch.device("cpu"), compile_model=False)
    x = torch.from_numpy(next(smoke._eval_rows(tok))[:, :-1].astype(np.int64))
    with torch.no_grad():
        assert torch.equal(forward(x), model(x))
    smoke.check_causal(forward, next(smoke._eval_rows(tok)), tok.get_vocab_size())
    # on a GPU the evaluator compiles the graph with Inductor, as here on the CPU (Dynamo cannot
    # re-trace an exported FlexAttention node, so it is not torch.compile), through Inductor's
    # cache: without a shape environment it bypassed it, and every run compiled afresh
    from torch._dynamo.utils import counters
    counters.clear()
    for _ in range(2):
        compiled, _ = smoke.load_handover(str(tmp_path / "h"), torch.device("cpu"), compile_model=True)
        with torch.no_grad():
            assert torch.allclose(compiled(x), model(x), atol=1e-4)
    assert counters["inductor"]["fxgraph_cache_bypass"] == 0 and counters["inductor"]["fxgraph_cache_hit"] >= 1, counters


class Lookahead(torch.nn.Module):
    """A bigram model that also sees the next input token: the classic fake gain."""

    def __init__(self, V, reach=1):
        super().__init__()
        self.now, self.next, self.reach = torch.nn.Embedding(V, V), torch.nn.Embedding(V, V), reach

    def forward(self, x):
        return self.now(x) + self.next(x.roll(-self.reach, dims=1))


@pytest.mark.parametrize("reach", [1, 37])
def test_a_model_that_looks_ahead_is_refused(smoke, tmp_path, reach):
    tok = smoke.Tokenizer.from_directory()
    smoke.handover(Lookahead(tok.get_vocab_size(), reach), str(tmp_path / "h"))
    with pytest.raises(smoke.PrepareError, match="the model looks ahead"):
        smoke.evaluate_handover(str(tmp_path / "h"))


def test_a_causal_model_passes_the_causality_check(smoke, tmp_path):
    tok = smoke.Tokenizer.from_directory()
    model = smoke_gpt(smoke)  # train.py's attention: causal, and windowed in some layers
    for _ in range(3):  # random cut points each time
        smoke.check_causal(model, next(smoke._eval_rows(tok)), tok.get_vocab_size())


def test_the_causality_checks_tokens_take_more_than_32_bits_of_its_randomness(smoke):
    """The replacement tokens come from the evaluator's random source itself. Drawn from a generator
    seeded by it, they depended on 32 bits (torch keeps the seed's low 32): a model could guess
    them from the batch and so learn the true token at the cut. Two sources that differ only above
    bit 32 must give other tokens."""
    import random
    tok = smoke.Tokenizer.from_directory()
    rows = next(smoke._eval_rows(tok))

    class Source(random.Random):
        def __init__(self, high):
            super().__init__(0)
            self.high = high

        def getrandbits(self, k):  # the same low 32 bits of every draw, other bits above them
            return sum(((self.high << 32) | 12345) << (64 * i) for i in range(k // 64)) & ((1 << k) - 1) if k >= 64 \
                else super().getrandbits(k)
    seen = []
    for high in (1, 2):
        smoke.check_causal(lambda x: seen.append(x.clone()) or torch.zeros(*x.shape, 4), rows, tok.get_vocab_size(),
                           rng=Source(high))
    assert torch.equal(seen[0], seen[2]) and not torch.equal(seen[1], seen[3])


def _crafted(smoke, tmp_path, mutate):
    """A hand-over written by handover(), then edited: what a train.py could write there."""
    tok = smoke.Tokenizer.from_directory()
    d = tmp_path / "h"
    smoke.handover(ConstantModel(torch.zeros(tok.get_vocab_size())), str(d))
    meta = json.loads((d / "model.json").read_text())
    mutate(meta)
    (d / "model.json").write_text(json.dumps(meta))
    return str(d)


@pytest.mark.parametrize("target, why", [
    ("aten.from_file.default", "it takes a string"),
    ("aten._print.default", "it takes a string"),
    ("aten.add_.Tensor", "changes its inputs in place"),
    ("aten.__class__.__init__", "does not run"),
    ("builtins.exec", "only PyTorch's aten operators"),
    ("os.system", "only PyTorch's aten operators"),
    ("higher_order.run_const_graph", "only PyTorch's aten operators"),
])
def test_the_evaluator_runs_allowed_operations_only(smoke, tmp_path, target, why):
    def mutate(meta):
        call = next(n for n in meta["graph"] if n["op"] == "call_function")
        call["target"] = target
    with pytest.raises(smoke.PrepareError, match=re.escape(why)):
        smoke.evaluate_handover(_crafted(smoke, tmp_path, mutate))


@pytest.mark.parametrize("where", ["weight", "argument"])
def test_the_evaluator_reads_ordinary_tensor_types_only(smoke, tmp_path, where):
    """A quantized or bit-packed type, which few kernels know the size of, is refused by name."""
    def mutate(meta):
        if where == "weight":
            meta["tensors"][0]["dtype"] = "quint4x2"
        else:
            call = next(n for n in meta["graph"] if n["op"] == "call_function")
            call.update(target="aten._to_copy.default", args=[{"node": 0}],
                        kwargs={"dict": [["dtype", {"dtype": "qint8"}]]})
    with pytest.raises(smoke.PrepareError, match="quint4x2|qint8") as e:
        smoke.evaluate_handover(_crafted(smoke, tmp_path, mutate))
    assert "which the evaluator does not read: use one of bfloat16, bool" in str(e.value)


def test_a_missing_or_unreadable_hand_over_is_a_clear_error(smoke, tmp_path):
    with pytest.raises(smoke.PrepareError, match="handed no model over"):
        smoke.evaluate_handover(str(tmp_path / "nothing"))
    def lie(meta):
        meta["tensors"][0]["bytes"] += 4
    with pytest.raises(smoke.PrepareError, match="not what model.json describes"):
        smoke.evaluate_handover(_crafted(smoke, tmp_path, lie))
    r = run_prepare(os.path.dirname(smoke.CACHE_DIR), "--evaluate", str(tmp_path / "nothing"))
    assert r.returncode == 1 and r.stdout.startswith("reason: train.py handed no model over")


def test_the_budget_clock_is_the_batch_servers_and_run_shs(smoke):
    budget, allowed = smoke.TIME_BUDGET, smoke.TIME_BUDGET * smoke.TRAIN_SLACK[0] + smoke.TRAIN_SLACK[1]
    up, warm = smoke.STARTUP_ALLOWANCE, smoke.WARMUP_ALLOWANCE
    served = lambda first, clock, batches=100: "noise from the server\nserved: " + json.dumps(  # noqa: E731
        {"batches": batches, "tokens": batches * 2048, "first": first, "clock": clock, "clock_batch": 32})
    handover = json.dumps({"kind": "handover", "time": 1040, "peak_vram_mb": 12.5})
    # start-up and warm-up before the 32nd batch are not counted
    r = smoke.check_training(served(1005, 1020), handover, launched=1000.0, exited=1020 + budget)
    assert float(r["training_seconds"]) == pytest.approx(budget) and r["clock_from"] == "training batch 32"
    assert float(r["startup_seconds"]) == pytest.approx(5) and float(r["warmup_seconds"]) == pytest.approx(15)
    assert r["peak_vram_mb"] == "12.5" and r["training_batches"] == 100 and r["training_tokens"] == 204800
    with pytest.raises(smoke.PrepareError, match="by the harness's clock"):
        smoke.check_training(served(1005, 1020), handover, launched=1000.0, exited=1020 + allowed + 1)
    # a 32nd batch drawn late: the clock starts WARMUP_ALLOWANCE after the first
    r = smoke.check_training(served(1005, 1005 + warm + 50), "", launched=1000.0, exited=1005 + warm + budget)
    assert float(r["training_seconds"]) == pytest.approx(budget) and "WARMUP_ALLOWANCE" in r["clock_from"]
    with pytest.raises(smoke.PrepareError, match="WARMUP_ALLOWANCE"):
        smoke.check_training(served(1005, None, batches=31), "", launched=1000.0, exited=1005 + warm + allowed + 1)
    # no batch by STARTUP_ALLOWANCE (or none at all, or no server report): the first counts as served then
    for text in (served(1000 + up + 40, None, 3), served(None, None, 0), "", "served: {]"[:0]):
        with pytest.raises(smoke.PrepareError, match="STARTUP_ALLOWANCE"):
            smoke.check_training(text, "", launched=1000.0, exited=1000 + up + warm + allowed + 1)
    # the record is train.py's: a forged hand-over time or memory shifts nothing that decides
    forged = json.dumps({"kind": "handover", "time": "x\nval_bpb: 0.01", "peak_vram_mb": "1\nval_bpb: 0.01"})
    r = smoke.check_training(served(1005, 1020), forged + "\n{]", launched=1000.0, exited=1020 + budget)
    assert all("\n" not in str(v) for v in r.values()) and r["peak_vram_mb"] == "0.0"
    assert smoke.TRAINING_LIMIT == up + warm + allowed  # run.sh kills training there


def test_the_batch_server_serves_what_a_local_loader_packs(smoke):
    """run.sh's batch server and train.py's client, over real pipes: the same batches as the local
    loader, and a `served:` report with the clock."""
    tok = smoke.Tokenizer.from_directory()
    srv = subprocess.Popen([sys.executable, "-I", os.path.join(ROOT, "prepare.py"), "--serve-batches"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        smoke._batch_fds = (srv.stdout.fileno(), srv.stdin.fileno())
        served = smoke.make_dataloader(tok, 8, 256, device="cpu", prefetch=1)
        got = [next(served)[0] for _ in range(40)]
    finally:
        smoke._batch_fds = None
        srv.stdin.close()
    report = srv.stderr.read().decode()
    srv.wait(timeout=30)
    local = smoke.make_dataloader(tok, 8, 256, device="cpu")
    assert all(torch.equal(a, next(local)[0]) for a in got)
    lines = [json.loads(line[len("served: "):]) for line in report.splitlines() if line.startswith("served: ")]
    # written at the first batch, when the clock starts (32 default batches of tokens), and at the end
    assert [line["batches"] for line in lines[:2]] == [1, 32] and lines[1]["clock_batch"] == 32
    counts = lines[-1]
    assert counts["batches"] >= 40 and counts["tokens"] == counts["batches"] * 8 * 256 and counts["clock"] >= counts["first"]
    with pytest.raises(smoke.PrepareError, match="B x T at most"):
        smoke._check_batch_shape(1 << 20, 1024)
    # more shapes than a run needs, or a line that is no request, end the server with a reason
    shapes = "".join(f"1 {t}\n" for t in range(1, smoke.MAX_BATCH_SHAPES + 2)).encode()
    for stdin, why in ((shapes, "batch shapes"), (b"x" * 10000, "not a request")):
        r = subprocess.run([sys.executable, "-I", os.path.join(ROOT, "prepare.py"), "--serve-batches"], input=stdin,
                           capture_output=True, timeout=60)
        assert r.returncode == 1 and why in r.stderr.decode() and "served: " in r.stderr.decode()


def test_make_dataloader_refuses_the_validation_split(smoke):
    with pytest.raises(smoke.PrepareError, match="evaluator alone"):
        smoke.make_dataloader(smoke.Tokenizer.from_directory(), 4, 64, "val")


def test_the_evaluation_splits_are_not_served_while_training(smoke, monkeypatch):
    monkeypatch.setattr(smoke, "_HANDOVER", "/somewhere")  # run.sh's training process
    tok = smoke.Tokenizer.from_directory()
    for split in ("val", "heldout"):
        with pytest.raises(smoke.PrepareError, match=f"the {split} split is not served while train.py trains"):
            next(smoke._eval_rows(tok, split))
    assert next(smoke.make_dataloader(tok, 2, 64, device="cpu"))[0].shape == (2, 64)


def test_evaluate_bpb_refuses_changed_validation_data(tmp_path):
    cache = tmp_path / "cache"
    assert run_prepare(cache).returncode == 0
    P = load_prepare(cache)
    tok = P.Tokenizer.from_directory()
    val = P.split_files("val")[0]
    data = bytearray(open(val, "rb").read())
    data[10] ^= 1
    open(val, "wb").write(bytes(data))
    with pytest.raises(P.PrepareError, match="validation tokens"):
        P.evaluate_bpb(ConstantModel(torch.zeros(tok.get_vocab_size())), tok, 4)
    r = run_prepare(cache, "--check")
    assert r.returncode == 1 and "validation tokens" in r.stderr and "prepare.py" in r.stderr


# --- resume and corruption ---------------------------------------------------------

def test_rerun_does_only_what_is_missing_and_rebuilds_corrupt_files(tmp_path):
    cache = tmp_path / "cache"
    srcs = []
    for i in range(3):
        p = tmp_path / f"part{i}.txt"
        p.write_text("\n<|endoftext|>\n".join(words_corpus(150, seed=10 + i)))
        srcs.append(str(p))
    assert run_prepare(cache, "--data", *srcs).returncode == 0
    P = load_prepare(cache)
    files = sorted(os.listdir(P.TOKENS_DIR))
    before = {f: open(os.path.join(P.TOKENS_DIR, f), "rb").read() for f in files}

    r = run_prepare(cache, "--data", *srcs)
    assert r.returncode == 0 and "3 of 3 sources already tokenized" in r.stdout
    assert "already trained" in r.stdout

    # a truncated file and a flipped byte: both detected and rebuilt, the rest left alone
    with open(os.path.join(P.TOKENS_DIR, "train_00001.bin"), "r+b") as f:
        f.truncate(100)
    b = bytearray(before["train_00002.bin"])
    b[7] ^= 0xFF
    open(os.path.join(P.TOKENS_DIR, "train_00002.bin"), "wb").write(bytes(b))
    mtime0 = os.path.getmtime(os.path.join(P.TOKENS_DIR, "train_00000.bin"))
    r = run_prepare(cache, "--data", *srcs)
    assert r.returncode == 0 and "1 of 3 sources already tokenized, tokenizing 2" in r.stdout
    assert {f: open(os.path.join(P.TOKENS_DIR, f), "rb").read() for f in files} == before
    assert os.path.getmtime(os.path.join(P.TOKENS_DIR, "train_00000.bin")) == mtime0
    assert run_prepare(cache, "--check").returncode == 0

    # fewer sources than before: the files of the dropped one go, so they are never read
    cache2 = tmp_path / "cache2"
    assert run_prepare(cache2, "--data", *srcs).returncode == 0
    assert run_prepare(cache2, "--data", *srcs[:2]).returncode == 1  # a different corpus: refused
    os.remove(cache2 / "smoke" / "manifest.json")  # the user deleted these, as the error says, to reuse the cache
    shutil.rmtree(cache2 / "smoke" / "tokenizer")
    assert run_prepare(cache2, "--data", *srcs[:2]).returncode == 0
    assert sorted(os.listdir(cache2 / "smoke" / "tokens")) == sorted(f for f in files if "00002" not in f)


def shard_bytes(i, n_docs=120):
    """A real parquet shard of pseudo-word documents, as bytes."""
    docs = words_corpus(n_docs, seed=i)
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), buf, row_group_size=40)
    return buf.getvalue().to_pybytes()


@pytest.fixture
def mirror(tmp_path):
    """A local hub with the validation and held-out shards and training shards 0-3; prepare.py imported
    against it."""
    m = Mirror({f"shard_{i:05d}.parquet": shard_bytes(i) for i in (0, 1, 2, 3, 6541, 6542)})
    saved = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_TOKEN")}
    os.environ["HF_ENDPOINT"] = m.endpoint
    os.environ.pop("HF_TOKEN", None)
    m.P = load_prepare(tmp_path / "cache", smoke=False)
    m.data = tmp_path / "cache" / "data"
    yield m
    m.close()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_download_is_retried_resumed_and_atomic(mirror):
    P, data = mirror.P, mirror.data
    assert P.BASE_URL == mirror.base_url  # HF_ENDPOINT, as huggingface_hub reads it
    data.mkdir(parents=True)
    whole = mirror.files["shard_00001.parquet"]
    (data / "shard_00001.parquet.part").write_bytes(whole[:len(whole) // 2])  # an interrupted run
    mirror.faults["shard_00000.parquet"] = ["500", "truncated", "close"]
    mirror.faults["shard_06542.parquet"] = ["reset", "norange"]
    files = P.download_climbmix(2, workers=3)
    assert [os.path.basename(f) for f in files] == ["shard_06542.parquet", "shard_06541.parquet",
                                                    "shard_00000.parquet", "shard_00001.parquet"]
    for name in ("shard_00000.parquet", "shard_00001.parquet", "shard_06541.parquet", "shard_06542.parquet"):
        assert (data / name).read_bytes() == mirror.files[name]
    assert not list(data.glob("*.part"))
    assert [r[3] for r in mirror.requests("cdn", "shard_00001.parquet")] == [len(whole) // 2]  # resumed, not restarted
    # after a 500: a complete response 1000 bytes short of the published size, then a clean close
    # mid-body: each time the rest is asked for with Range, where the file stopped
    n = len(mirror.files["shard_00000.parquet"])
    assert [r[3] for r in mirror.requests("cdn", "shard_00000.parquet")] == [0, n - 1000, n - 500]
    # a reset mid-body is resumed; a server that ignores the Range (200) is read from the start
    starts = [r[3] for r in mirror.requests("cdn", "shard_06542.parquet")]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] > 0


def test_download_is_verified_against_the_published_sha256(mirror):
    P, data = mirror.P, mirror.data
    mirror.faults["shard_00000.parquet"] = ["corrupt"]  # one flipped byte: same size, parses as parquet
    P.download_climbmix(1, workers=2)
    assert (data / "shard_00000.parquet").read_bytes() == mirror.files["shard_00000.parquet"]
    assert len(mirror.requests("cdn", "shard_00000.parquet")) == 2  # fetched again from scratch
    # a file that never matches: fetched twice, then an error naming the shard; nothing left behind
    mirror.sticky["shard_00001.parquet"] = "wrongsha"
    with pytest.raises(P.PrepareError, match="shard_00001.parquet: the download does not match the sha256"):
        P.download_climbmix(2, workers=1)
    assert len(mirror.requests("cdn", "shard_00001.parquet")) == 2
    assert not (data / "shard_00001.parquet").exists() and not (data / "shard_00001.parquet.part").exists()


def test_a_bad_resumed_beginning_is_caught(mirror):
    """A .part whose first bytes are wrong (from another file, or a bad disk): the Range request
    completes it, the sha256 refuses it, and the next download starts from byte 0."""
    P, data = mirror.P, mirror.data
    data.mkdir(parents=True)
    whole = mirror.files["shard_00000.parquet"]
    (data / "shard_00000.parquet.part").write_bytes(b"x" * 100 + whole[100:len(whole) // 2])
    P.download_climbmix(1, workers=2)
    assert (data / "shard_00000.parquet").read_bytes() == whole
    assert [r[3] for r in mirror.requests("cdn", "shard_00000.parquet")] == [len(whole) // 2, 0]


def test_hf_token_goes_to_the_hub_only(mirror):
    P = mirror.P
    mirror.token = "hf_secret"
    with pytest.raises(P.PrepareError, match="HTTP 401.*HF_TOKEN"):
        P.download_climbmix(1, workers=2)
    os.environ["HF_TOKEN"] = "hf_secret"
    P.download_climbmix(1, workers=2)
    assert (mirror.data / "shard_00000.parquet").read_bytes() == mirror.files["shard_00000.parquet"]
    hub = [r for r in mirror.log if r[1] == "hub" and r[2] == "shard_00000.parquet"]
    cdn = mirror.requests("cdn", "shard_00000.parquet")
    assert hub[-1][4] and cdn and not any(r[4] for r in cdn)  # the CDN never sees the token


def test_an_error_stops_the_other_downloads_at_once(mirror):
    """A 404 on one shard while the others crawl: the error comes at once, the others stop, and
    nothing is renamed into place afterwards (their .part files stay for a rerun to resume)."""
    P, data = mirror.P, mirror.data
    mirror.rate = 100_000  # about 1.5 s per shard
    for i in (0, 1, 6541, 6542):
        mirror.sticky[f"shard_{i:05d}.parquet"] = "slow"
    mirror.sticky["shard_00002.parquet"] = "404"
    t0 = time.time()
    with pytest.raises(P.PrepareError, match="HTTP 404"):
        P.download_climbmix(3, workers=5)  # one worker per shard: validation, held-out, 0, 1 and 2
    assert time.time() - t0 < 1.0
    time.sleep(2.5)  # longer than the slow shards need
    assert not list(data.glob("*.parquet"))
    parts = list(data.glob("*.part"))
    assert parts and all(p.stat().st_size < len(mirror.files[p.name[:-5]]) for p in parts)


def test_ctrl_c_stops_prepare_at_once(tmp_path):
    with Mirror({f"shard_{i:05d}.parquet": shard_bytes(i) for i in (0, 1, 6541, 6542)}, rate=50_000) as m:
        for name in m.files:
            m.sticky[name] = "slow"  # about 3 s per shard
        cache = tmp_path / "cache"
        e = {**os.environ, "AUTORESEARCH_CACHE": str(cache), "AUTORESEARCH_SMOKE": "0", "HF_ENDPOINT": m.endpoint}
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "prepare.py"), "--num-shards", "2"], env=e,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 30
        while not any(p.stat().st_size for p in (cache / "data").glob("*.part")) and time.time() < deadline:
            time.sleep(0.05)
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
        assert time.time() - t0 < 1.5  # no waiting for the downloads in flight
        assert not list((cache / "data").glob("*.parquet")) and list((cache / "data").glob("*.part"))


# --- bad input ---------------------------------------------------------------------

def bad_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café au lait, déjà vu".encode("latin-1"))
    notext = tmp_path / "notext.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), notext)
    notjson = tmp_path / "bad.jsonl"
    notjson.write_text('{"text": "fine"}\nnot json\n')
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), numbers)
    P = load_prepare(tmp_path / "unused")
    one = tmp_path / "one.txt"  # a single document, one that the hash sends to validation
    one.write_text(next(d for d in words_corpus(200, seed=5) if P.is_val_document(d)))
    few = tmp_path / "few.jsonl"  # documents, none of which the hash sends to validation
    few.write_text("".join(json.dumps({"text": d}) + "\n" for d in words_corpus(40, seed=6) if not P.is_val_document(d)))
    return {
        "no such file": [str(tmp_path / "missing.parquet")],
        "no documents": [str(empty)],
        "not UTF-8": [str(latin)],
        "no 'text' column": [str(notext)],
        ":2: expected a JSON object": [str(notjson)],
        "unsupported file type": [str(csv)],
        "numbers.parquet: the 'text' column holds int64, not strings": [str(numbers)],
        "one.txt: its only document went to validation": [str(one)],
        "the validation split would be empty": [str(few)],
    }


@pytest.mark.parametrize("case", ["no such file", "no documents", "not UTF-8", "no 'text' column",
                                  ":2: expected a JSON object", "unsupported file type",
                                  "numbers.parquet: the 'text' column holds int64, not strings",
                                  "one.txt: its only document went to validation", "the validation split would be empty"])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, case):
    paths = bad_inputs(tmp_path)[case]
    cache = tmp_path / "cache"
    r = run_prepare(cache, "--data", *paths)
    assert r.returncode == 1
    assert case in r.stderr and "Traceback" not in r.stderr
    assert not (cache / "smoke" / "tokens").exists() and not (cache / "smoke" / "tokenizer").exists()


def test_check_without_data_names_the_command(tmp_path):
    r = run_prepare(tmp_path / "nothing", "--check")
    assert r.returncode == 1 and "AUTORESEARCH_SMOKE=1 uv run prepare.py" in r.stderr


def test_a_different_corpus_is_refused_not_overwritten(tmp_path):
    cache = tmp_path / "cache"
    a = tmp_path / "a.txt"
    a.write_text("\n<|endoftext|>\n".join(words_corpus(300, seed=3)))
    assert run_prepare(cache).returncode == 0
    r = run_prepare(cache, "--data", str(a))
    assert r.returncode == 1 and "AUTORESEARCH_CACHE" in r.stderr
    assert run_prepare(cache, "--check").returncode == 0
    os.remove(cache / "smoke" / "manifest.json")  # as if interrupted after the tokenizer was trained
    r = run_prepare(cache, "--data", str(a))
    assert r.returncode == 1 and "tokenizer" in r.stderr and "trained on [smoke: python stdlib]" in r.stderr


# --- prepared data keyed on content; --check ------------------------------------------

def two_sources(tmp_path):
    srcs = []
    for i in range(2):
        p = tmp_path / f"part{i}.txt"
        p.write_text("\n<|endoftext|>\n".join(words_corpus(150, seed=20 + i)))
        srcs.append(str(p))
    return srcs


def test_an_edited_source_is_tokenized_again(tmp_path):
    cache, srcs = tmp_path / "cache", two_sources(tmp_path)
    assert run_prepare(cache, "--data", *srcs).returncode == 0
    manifest = cache / "smoke" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    r = run_prepare(cache, "--data", *srcs)  # nothing changed: nothing rebuilt, manifest.json left alone
    assert r.returncode == 0 and "2 of 2 sources already tokenized" in r.stdout and "(unchanged)" in r.stdout
    assert manifest.stat().st_mtime_ns == stamp
    # the same size and the same mtime, different content: found by its sha256
    st = os.stat(srcs[1])
    text = open(srcs[1]).read()
    open(srcs[1], "w").write(text.replace("Number", "NUMBER"))
    os.utime(srcs[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    P = load_prepare(cache)
    with pytest.raises(P.PrepareError, match="part1.txt changed after it was tokenized"):
        P.check_prepared(full=True)
    P.check_prepared()  # quick: the prepared files only, and they are intact
    r = run_prepare(cache, "--data", *srcs)
    assert r.returncode == 0 and "1 of 2 sources already tokenized, tokenizing 1" in r.stdout
    tok = P.Tokenizer.from_directory()
    train = tok.decode(np.fromfile(P.split_files("train")[1], dtype=np.uint16).tolist())
    assert "NUMBER" in train and "Number" not in train
    P.check_prepared(full=True)


def test_check_covers_every_token_file_and_a_changed_tokenizer_is_never_reblessed(tmp_path):
    cache, srcs = tmp_path / "cache", two_sources(tmp_path)
    assert run_prepare(cache, "--data", *srcs).returncode == 0
    tokens = cache / "smoke" / "tokens"
    r = run_prepare(cache, "--check")
    assert r.returncode == 0 and "every file by sha256" in r.stdout
    # the corpus's files, for run.sh to refuse one that training's sandbox would show
    assert [l for l in r.stdout.splitlines() if l.startswith("source: ")] == [f"source: {s}" for s in srcs]
    P = load_prepare(cache)

    # a flipped byte in a training file, its size and mtime kept: the full check reads it, quick cannot
    f = tokens / "train_00001.bin"
    st, good = f.stat(), f.read_bytes()
    with open(f, "r+b") as fh:
        fh.seek(11)
        fh.write(bytes([good[11] ^ 1]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(P.PrepareError, match="train_00001.bin does not match its sha256"):
        P.check_prepared(full=True)
    P.check_prepared()
    os.utime(f)  # written now: the quick check sees it
    r = run_prepare(cache, "--check", "--quick")
    assert r.returncode == 1 and "train_00001.bin was written after it was prepared" in r.stderr and "prepare.py" in r.stderr
    f.write_bytes(good)  # the right content again, but written since: prepare.py verifies and records it
    P.check_prepared(full=True)
    with pytest.raises(P.PrepareError, match="written after it was prepared"):
        P.check_prepared()
    r = run_prepare(cache, "--data", *srcs)
    assert r.returncode == 0 and "2 of 2 sources already tokenized" in r.stdout
    P.check_prepared()
    (tokens / "train_00000.bin").rename(tmp_path / "moved.bin")
    for full in (True, False):
        with pytest.raises(P.PrepareError, match="missing or not made by prepare.py"):
            P.check_prepared(full)
    (tmp_path / "moved.bin").rename(tokens / "train_00000.bin")
    (tokens / "train_00007.bin").write_bytes(good)  # the loader would read it: refused
    for full in (True, False):
        with pytest.raises(P.PrepareError, match="missing or not made by prepare.py"):
            P.check_prepared(full)
    (tokens / "train_00007.bin").unlink()

    # the tokenizer changed on disk (two ranks swapped: still a valid tokenizer): an error that says
    # how to rebuild, never re-blessed; nothing is rewritten
    tok = cache / "smoke" / "tokenizer" / "tokenizer.tiktoken"
    lines = tok.read_text().splitlines(keepends=True)
    lines[300], lines[301] = lines[300].split()[0] + " 301\n", lines[301].split()[0] + " 300\n"
    tok.write_text("".join(lines))
    before = {p.name: p.read_bytes() for p in (cache / "smoke").rglob("*") if p.is_file()}
    r = run_prepare(cache, "--data", *srcs)
    assert r.returncode == 1 and "does not match manifest.json" in r.stderr and "rm -r" in r.stderr
    assert "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in (cache / "smoke").rglob("*") if p.is_file()} == before
    for full in (True, False):
        with pytest.raises(P.PrepareError, match="does not match manifest.json.*rm -r"):
            P.check_prepared(full)
    os.remove(cache / "smoke" / "manifest.json")  # as after an interrupted first run: the tokenizer's own record
    r = run_prepare(cache, "--data", *srcs)
    assert r.returncode == 1 and "tokenizer.tiktoken is not the file that was trained" in r.stderr


def test_sigkill_of_prepare_leaves_no_tokenizing_worker(tmp_path):
    """Workers hold ~400 MB each for minutes: when prepare.py is killed outright, they go too."""
    cache, src = tmp_path / "cache", tmp_path / "corpus.txt"
    docs = words_corpus(150, seed=30)
    src.write_text("\n<|endoftext|>\n".join(docs))
    assert run_prepare(cache, "--data", str(src)).returncode == 0  # the tokenizer, trained on a small corpus
    src.write_text("\n<|endoftext|>\n".join(docs * 150))  # the same file grown: tokenized again (many seconds)
    e = {**os.environ, "AUTORESEARCH_CACHE": str(cache), "AUTORESEARCH_SMOKE": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "prepare.py"), "--data", str(src)], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def children():
        found = []
        for d in os.listdir("/proc"):
            try:
                if d.isdigit() and open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1] == str(proc.pid):
                    found.append(int(d))
            except OSError:
                pass
        return found

    def alive(pid):
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in "ZX"
        except OSError:
            return False

    for line in proc.stdout:
        if "tokenizing 1" in line:
            break
    time.sleep(1.0)  # the worker is busy now
    workers = children()
    assert workers and proc.poll() is None, "tokenization ended before the test could kill prepare.py"
    proc.kill()
    proc.wait()
    deadline = time.time() + 2.0
    while any(alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.05)
    left = [p for p in workers if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "tokenizing workers outlived prepare.py"


# --- --data with datasets ------------------------------------------------------------

def test_data_saved_with_datasets(tmp_path):
    """A DatasetDict saved with save_to_disk: every split's text, tokenized offline; the corpus is
    named by its directory."""
    import datasets
    docs = words_corpus(300, seed=40, marker="doc")
    saved = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": docs[:250], "n": list(range(250))}),
        "validation": datasets.Dataset.from_dict({"text": docs[250:], "n": list(range(50))}),
    }).save_to_disk(str(saved))
    cache = tmp_path / "cache"
    r = run_prepare(cache, "--data", str(saved), env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "Data: 2 files, 300 documents" in r.stdout
    P = load_prepare(cache)
    m = P.check_prepared(full=True)
    assert m["source"] == f"data: {saved}" and len(m["files"]) == 2
    tok = P.Tokenizer.from_directory()
    text = "".join(tok.decode(np.fromfile(f, dtype=np.uint16).tolist()) for split in P.SPLITS for f in P.split_files(split))
    assert all(d in text for d in docs)  # every document, once tokenized
    # a saved dataset without a text column, and a name that is neither here nor loadable: one line each
    datasets.Dataset.from_dict({"content": ["a", "b"]}).save_to_disk(str(tmp_path / "notext"))
    r = run_prepare(tmp_path / "c2", "--data", str(tmp_path / "notext"))
    assert r.returncode == 1 and "no 'text' column of strings (columns: content)" in r.stderr and "Traceback" not in r.stderr
    r = run_prepare(tmp_path / "c3", "--data", "nobody/no-such-dataset", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 1 and "nobody/no-such-dataset: no such file or directory here" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "c3" / "smoke" / "tokens").exists()


def test_the_limits_the_documents_state_are_prepare_pys(tmp_path):
    """program.md and README.md state the start-up allowance and the training limit: the figures
    must be prepare.py's, in both profiles."""
    figures = {}
    for smoke in (False, True):
        env = {**os.environ, "AUTORESEARCH_CACHE": str(tmp_path), "AUTORESEARCH_SMOKE": "1" if smoke else "0"}
        out = subprocess.run([sys.executable, "-c", "import prepare as P; "
                              "print(P.STARTUP_ALLOWANCE, P.WARMUP_ALLOWANCE, round(P.TRAINING_LIMIT))"],
                             cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.split()
        figures[smoke] = [int(v) for v in out]
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())  # line breaks as spaces
    program = " ".join(open(os.path.join(ROOT, "program.md")).read().split())
    (up, warm, limit), (s_up, s_warm, s_limit) = figures[False], figures[True]
    assert f"`WARMUP_ALLOWANCE` seconds after the first ({warm} s; smoke {s_warm} s)" in readme
    assert f"`STARTUP_ALLOWANCE` seconds after the launch at the latest ({up} s; smoke {s_up} s)" in readme
    assert f"TIME_BUDGET × 1.2 + 5 s` ({limit} s; smoke {s_limit} s)" in readme
    assert f"`STARTUP_ALLOWANCE + WARMUP_ALLOWANCE + TIME_BUDGET × 1.2 + 5` ({limit} s; smoke {s_limit} s)" in readme
    assert f"under a time limit of {limit} s" in program


FENCE = "# ==== THE HARNESS: not needed to edit train.py. The agent reads prepare.py up to this line. ===="


def test_the_agent_reads_prepare_py_up_to_one_fence_and_train_py_needs_nothing_below_it():
    """The agent reads prepare.py up to the fence (program.md): one fence, at most 12,000 characters
    above it, and everything train.py takes from prepare.py is defined there; no function or class
    defined below it is named in train.py."""
    import ast
    text = open(os.path.join(ROOT, "prepare.py"), encoding="utf-8").read()
    assert text.count("# ==== THE HARNESS") == 1 and f"\n{FENCE}\n" in text
    above = text[:text.index(FENCE)]
    assert len(above) <= 12_000, f"{len(above):,} characters above the fence"
    fence_line = above.count("\n") + 1

    def defined(node):  # the module-level names a statement of prepare.py defines
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            return {node.name}
        return {t.id for n in ast.walk(node) if isinstance(n, (ast.Assign, ast.AnnAssign))
                for target in (n.targets if isinstance(n, ast.Assign) else [n.target])
                for t in ast.walk(target) if isinstance(t, ast.Name)}
    tree = ast.parse(text)
    above_names = set().union(*(defined(n) for n in tree.body if n.end_lineno < fence_line))
    below_defs = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.lineno > fence_line}
    assert {"MAX_SEQ_LEN", "TIME_BUDGET", "EVAL_TOKENS", "VOCAB_SIZE", "SMOKE", "WARMUP_TOKENS", "STARTUP_ALLOWANCE",
            "WARMUP_ALLOWANCE", "TRAIN_SLACK", "TRAINING_LIMIT", "Tokenizer", "make_dataloader", "evaluate_bpb"} <= above_names

    train = ast.parse(open(os.path.join(ROOT, "train.py"), encoding="utf-8").read())
    imported = {a.name for n in ast.walk(train) if isinstance(n, ast.ImportFrom) and n.module == "prepare" for a in n.names}
    via_module = {n.attr for n in ast.walk(train)
                  if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "prepare"}
    assert imported and not (imported | via_module) - above_names, (imported | via_module) - above_names
    own = {n.name for n in ast.walk(train) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    named = ({n.id for n in ast.walk(train) if isinstance(n, ast.Name)} - {"prepare"}) | via_module | imported
    assert not (named - own) & below_defs, (named - own) & below_defs

    # train.py imports prepare before torch to place the compile caches: prepare.py imports no
    # torch, and the caches are where run.sh's overlay and the evaluator's sandbox expect them
    out = subprocess.run([sys.executable, "-c", "import sys, prepare as P; print('torch' in sys.modules, "
                          "P.COMPILE_CACHE_DIR == P.CACHE_DIR + '/compile', P.EVALUATOR_CACHE_DIR == P.CACHE_DIR + '/evaluator')"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]


def _graph(smoke, tmp_path, nodes, kwargs_of=None):
    """A hand-over written by hand, as a train.py may: the graph's nodes, no tensors."""
    d = tmp_path / "crafted"
    d.mkdir(exist_ok=True)
    (d / "model.json").write_text(json.dumps({"inputs": ["x"], "tensors": [], "rows": smoke.EVAL_ROWS,
                                              "seq_len": smoke.MAX_SEQ_LEN, "graph": nodes}))
    (d / "model.bin").write_bytes(b"")
    return str(d)


def _call(target, *args, **kwargs):
    return {"op": "call_function", "target": target, "args": list(args), "kwargs": {"dict": [[k, v] for k, v in kwargs.items()]}}


def test_a_graph_cannot_reach_the_targets_through_strides(smoke, tmp_path):
    """The reviewer's attack: the inputs were a view of rows whose storage held the targets, so a
    strided read found them (val_bpb 0.000001). Now the input is a tensor of its own, and the
    operators that read strides or raw storage are refused."""
    N, T, V = (lambda i: {"node": i}), smoke.MAX_SEQ_LEN, smoke.VOCAB_SIZE
    nodes = [{"op": "placeholder"}, _call("aten.sym_stride.int", N(0), 0), _call("aten.sub.int", N(1), T),
             _call("aten.as_strided.default", N(0), [smoke.EVAL_ROWS, T], [N(1), 1], N(2)),
             _call("aten.one_hot.default", N(3), V), _call("aten._to_copy.default", N(4), dtype={"dtype": "float32"}),
             _call("aten.mul.Tensor", N(5), 20.0), {"op": "output", "args": [{"tuple": [N(6)]}]}]
    with pytest.raises(smoke.PrepareError, match="reads memory other than its inputs"):
        smoke.evaluate_handover(_graph(smoke, tmp_path, nodes))
    tok = smoke.Tokenizer.from_directory()
    x = smoke._inputs(next(smoke._eval_rows(tok)), "cpu")
    assert x.is_contiguous() and x.untyped_storage().nbytes() == x.numel() * 8  # nothing but the inputs


def test_keyword_names_in_a_hand_over_cannot_become_code(smoke, tmp_path):
    """FX writes keyword names into the code it generates: a name carrying code ran in the
    evaluator and printed a forged result."""
    evil = "padding_idx=-1)\nprint('val_bpb: 0.123456', flush=True); import os; os._exit(0)\ndef _g():\n    _z = dict(a"
    def inject(meta):
        next(n for n in meta["graph"] if n["op"] == "call_function")["kwargs"] = {"dict": [[evil, 0]]}
    with pytest.raises(smoke.PrepareError, match="arguments it does not take"):
        smoke.evaluate_handover(_crafted(smoke, tmp_path, inject))


def test_the_hand_over_files_must_be_regular_files_not_links(smoke, tmp_path):
    """model.bin linked to the validation tokens turned them into the model's 'weights'."""
    d = _crafted(smoke, tmp_path, lambda meta: None)
    os.remove(os.path.join(d, "model.bin"))
    os.symlink(smoke.split_files("val")[0], os.path.join(d, "model.bin"))
    with pytest.raises(smoke.PrepareError, match="a link"):
        smoke.evaluate_handover(d)
    os.remove(os.path.join(d, "model.bin"))
    os.mkfifo(os.path.join(d, "model.bin"))  # would block a plain read for ever
    with pytest.raises(smoke.PrepareError, match="not a regular file"):
        smoke.evaluate_handover(d)


@pytest.mark.parametrize("nodes_of, why", [
    # running statistics written in place by batch norm, though its schema does not say so: a call counter
    (lambda N, V: [_call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}),
                   _call("aten.native_batch_norm.default", N(1), None, None, None, None, True, 0.5, 1e-5)],
     "keeps state between calls"),
    (lambda N, V: [_call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}), _call("aten.rrelu.default", N(1))],
     "draws random numbers"),
    (lambda N, V: [_call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}),
                   _call("aten.binomial.default", N(1), N(1))], "draws random numbers"),
    # a string a compiler writes into the code it generates
    (lambda N, V: [_call("aten._assert_async.msg", N(0), "\\\"); system(\\\"touch /tmp/x\\\"); (\\\"")],
     "it takes a string"),
    (lambda N, V: [_call("aten.gelu.default", N(0), approximate="tanh'); import os; ('")], "the string"),
    # a device given as a string, which would not become the evaluator's device
    (lambda N, V: [_call("aten.zeros.default", [1], device="cpu")], "arguments it does not take"),
    (lambda N, V: [_call("aten.scaled_dot_product_attention.default", N(0), N(0), N(0), None, 0.5)], "no dropout"),
])
def test_the_evaluator_refuses_state_randomness_and_code_in_strings(smoke, tmp_path, nodes_of, why):
    """Found by an adversarial review: each let a graph count its calls, draw a coin, or write code."""
    N = lambda i: {"node": i}  # noqa: E731
    body = nodes_of(N, smoke.VOCAB_SIZE)
    nodes = [{"op": "placeholder"}] + body + [{"op": "output", "args": [{"tuple": [N(len(body))]}]}]
    with pytest.raises(smoke.PrepareError, match=why):
        smoke.evaluate_handover(_graph(smoke, tmp_path, nodes))


def _csr_read_past_the_inputs(N, R, T, V):
    """A sparse CSR matrix whose columns lie past its declared width: mm trusts them and reads the
    memory after the inputs (on a CPU, the heap: other values each call)."""
    n, dev = R * T, {"device": "cpu"}
    return [_call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}), _call("aten.view.default", N(1), [n, 1]),
            _call("aten.arange.start", 0, n + 1, dtype={"dtype": "int64"}, device=dev),
            _call("aten.arange.start", n, 2 * n, dtype={"dtype": "int64"}, device=dev),
            _call("aten.full.default", [n], 1.0, dtype={"dtype": "float32"}, device=dev),
            _call("aten.sparse_csr_tensor.crow_col_value_size", N(3), N(4), N(5), [n, n], dtype={"dtype": "float32"},
                  layout={"layout": "sparse_csr"}, device=dev),
            _call("aten.mm.default", N(6), N(2)), _call("aten.view.default", N(7), [R, T, 1]),
            _call("aten.expand.default", N(8), [R, T, V])]


@pytest.mark.parametrize("nodes_of, why", [
    (_csr_read_past_the_inputs, "reads memory other than its inputs"),
    (lambda N, R, T, V: [_call("aten.zeros.default", [R, T, V], layout={"layout": "sparse_coo"}, device={"device": "cpu"})],
     "does not read (layout)"),
    (lambda N, R, T, V: [_call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}),
                         _call("aten.segment_reduce.default", N(1), "sum", lengths=N(0), unsafe=True)],
     "not on the evaluator's list"),
    (lambda N, R, T, V: [_call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}),
                         _call("aten.view.default", N(1), [1, R * T, 1, 1]),
                         _call("aten._efficient_attention_forward.default", N(2), N(2), N(2), None, N(0), N(0), R * T,
                               R * T, 0.0, 0)], "not on the evaluator's list"),
])
def test_a_graph_cannot_read_past_its_inputs_through_indices_a_kernel_trusts(smoke, tmp_path, nodes_of, why):
    """Found by the third adversarial review: with a CSR matrix built from its own index tensors, a
    graph read the heap beyond its inputs, a different value each call (the first line of the
    logits, before the fix: 0.0, 0.0, 1.1e-43, 0.0, 6.6e14, 3.1e-41, -2.4e27, ...)."""
    N = lambda i: {"node": i}  # noqa: E731
    body = nodes_of(N, smoke.EVAL_ROWS, smoke.MAX_SEQ_LEN, smoke.VOCAB_SIZE)
    nodes = [{"op": "placeholder"}] + body + [{"op": "output", "args": [{"tuple": [N(len(body))]}]}]
    with pytest.raises(smoke.PrepareError, match=re.escape(why)):
        smoke.evaluate_handover(_graph(smoke, tmp_path, nodes))


@pytest.mark.parametrize("body", [
    # a view of any size and strides, unchecked: 64 floats read from a 4-float tensor came back 47
    # of them nonzero, the heap past it
    pytest.param(lambda N, n: [_call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}),
                               _call("aten._reshape_alias.default", N(1), [4 * n], [1])], id="_reshape_alias"),
    # offsets into the indices or rows, trusted by the kernels that take them
    pytest.param(lambda N, n: [_call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}),
                               _call("aten.view.default", N(0), [n]), _call("aten.view.default", N(1), [n, 1]),
                               _call("aten._embedding_bag.default", N(3), N(2), N(2))], id="_embedding_bag"),
    pytest.param(lambda N, n: [_call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}),
                               _call("aten.view.default", N(0), [n]),
                               _call("aten.segment_reduce.default", N(1), "sum", offsets=N(2))], id="segment_reduce"),
    pytest.param(lambda N, n: [_call("aten._to_copy.default", N(0), dtype={"dtype": "bfloat16"}),
                               _call("aten._to_copy.default", N(0), dtype={"dtype": "int32"}),
                               _call("aten._grouped_mm.default", N(1), N(1), N(2))], id="_grouped_mm"),
    # state beyond the graph: the GPU's FFT plan cache
    pytest.param(lambda N, n: [_call("aten._cufft_clear_plan_cache.default", 0)], id="_cufft_clear_plan_cache"),
    # SDPA's CPU kernel, which export never writes either: it trusts the key's and value's batch
    # and head counts (a query of 3 heads read the heap past a key and value of 2: 12.4, 1.6e32...)
    pytest.param(lambda N, n: [_call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}),
                               _call("aten.view.default", N(1), [1, 1, n, 1]),
                               _call("aten._scaled_dot_product_flash_attention_for_cpu.default", N(2), N(2), N(2),
                                     0.0, False)], id="_scaled_dot_product_flash_attention_for_cpu"),
    # SDPA's GPU kernel, which export never writes: random-number state beside the output
    pytest.param(lambda N, n: [_call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}),
                               _call("aten.view.default", N(1), [1, 1, n, 1]),
                               _call("aten._scaled_dot_product_efficient_attention.default", N(2), N(2), N(2), None,
                                     False)], id="_scaled_dot_product_efficient_attention"),
])
def test_operators_off_the_allow_list_are_refused_though_the_deny_list_missed_them(smoke, body):
    """The evaluator runs listed operators only. Each of these passed the deny-list before (found
    while the list was built; the CPU SDPA kernel by the fourth adversarial review, while it was on
    the list), and each trusts indices or reaches past the graph."""
    N = lambda i: {"node": i}  # noqa: E731
    body = body(N, smoke.EVAL_ROWS * smoke.MAX_SEQ_LEN)
    nodes = [{"op": "placeholder"}] + body + [{"op": "output", "args": [{"tuple": [N(len(body))]}]}]
    with pytest.raises(smoke.PrepareError, match=re.escape("which is not on the evaluator's list of operators "
                                                           "(prepare.py, _ALLOWED_OPS): write the forward pass")):
        smoke._decode_graph(nodes, torch.device("cpu"))


def test_every_operator_off_the_list_is_named_in_one_crash(smoke, tmp_path):
    """A model with three operators the evaluator does not run hears of all three at once: one
    crash and one edit, not three 5-minute runs, each finding the next."""
    N, n = (lambda i: {"node": i}), smoke.EVAL_ROWS * smoke.MAX_SEQ_LEN
    body = [_call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}),
            _call("aten._reshape_alias.default", N(1), [n], [1]),
            _call("aten.bucketize.Tensor", N(2), N(2)),
            _call("aten.native_dropout.default", N(3), 0.5, True)]
    nodes = [{"op": "placeholder"}] + body + [{"op": "output", "args": [{"tuple": [N(len(body))]}]}]
    with pytest.raises(smoke.PrepareError) as e:
        smoke.evaluate_handover(_graph(smoke, tmp_path, nodes))
    message = str(e.value)
    assert message.startswith("the model uses 3 operators the evaluator does not run: "), message
    for name in ("aten._reshape_alias.default", "aten.bucketize.Tensor", "aten.native_dropout.default"):
        assert name in message
    assert "draws random numbers" in message and "not on the evaluator's list" in message


class ResearchEdits(torch.nn.Module):
    """The edits research makes to train.py's model, each a term of one forward pass: what the
    evaluator must run as it is."""

    def __init__(self, V, T, D=32, H=4, E=4):
        super().__init__()
        self.H, self.E = H, E
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
        self.wte, self.ve = torch.nn.Embedding(V, D), torch.nn.Embedding(V, D)
        self.q, self.kv, self.ve_gate = lin(D, D), lin(D, D), lin(8, H)
        self.rms, self.ln = torch.nn.RMSNorm(D), torch.nn.LayerNorm(D)
        self.bn, self.gn = torch.nn.BatchNorm1d(D), torch.nn.GroupNorm(4, D)
        self.up, self.down = lin(D, 4 * D), lin(2 * D, D)
        self.router, self.experts = lin(D, E), torch.nn.Parameter(torch.randn(E, D, D) / D ** 0.5)
        self.conv = torch.nn.Conv1d(D, D, 4, groups=D, bias=False)
        angles = torch.outer(torch.arange(T).float(), 1e-4 ** (torch.arange(0, D // H, 2) / (D // H)))
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)

    def rotary(self, x):  # x: [B, T, H, hd]; as train.py's halves, and as interleaved pairs
        d = x.size(-1) // 2
        x1, x2 = x[..., :d], x[..., d:]
        halves = torch.cat([x1 * self.cos + x2 * self.sin, x2 * self.cos - x1 * self.sin], -1)
        even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
        pairs = torch.stack([even * self.cos - odd * self.sin, even * self.sin + odd * self.cos], -1).flatten(-2)
        return halves + pairs

    def gqa(self, h):  # 4 query heads, 2 key/value heads: SDPA's enable_gqa, and repeated heads
        B, T, D = h.shape
        q = self.rotary(self.q(h).view(B, T, self.H, -1)).transpose(1, 2)
        k, v = self.kv(h).view(B, T, self.H // 2, -1).transpose(1, 2).chunk(2, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        v = v[:, :, None].expand(-1, -1, 2, -1, -1).reshape(q.shape)  # Llama's repeat_kv: a copy, reshaped
        y = y + F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1), v, is_causal=True, scale=0.1)
        return y.transpose(1, 2).reshape(B, T, D)

    def manual_attention(self, h):  # causal mask by tril, where and masked_fill; ALiBi-like bias
        T = h.size(1)
        scores = h @ h.transpose(-1, -2) / h.size(-1) ** 0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        i = torch.arange(T, device=h.device)
        bias = -(i[:, None] - i[None, :]).clamp(min=0).float() * 0.1
        p = torch.where(causal, scores + bias, float("-inf")).softmax(-1) + F.softmax(
            scores.masked_fill(~causal, float("-inf")), dim=-1)
        return p @ h

    def norms_and_mlp(self, h):  # RMSNorm, LayerNorm, batch norm (evaluation mode), GroupNorm; SwiGLU, GELU, ReLU²
        h = self.rms(h) + F.rms_norm(h, (h.size(-1),)) + self.ln(h) + h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = h + self.bn(h.transpose(1, 2)).transpose(1, 2) + self.gn(h.transpose(1, 2)).transpose(1, 2)
        a, b = self.up(h).chunk(2, dim=-1)
        return self.down(F.silu(a) * b + F.gelu(a, approximate="tanh") + F.relu(b).square())

    def moe(self, h):  # top-2 of 4 experts: softmax router, topk; dispatch by scatter, gather, one_hot, index_add
        B, T, D = h.shape
        t = h.reshape(-1, D)
        probs = F.softmax(self.router(t), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, 2, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(t.dtype)
        out = torch.einsum("nd,edf->nef", t, self.experts)  # [N, E, D]: every expert on every token
        y = (out * torch.zeros_like(probs).scatter(-1, idx, w).unsqueeze(-1)).sum(1)
        y = y + (torch.gather(out, 1, idx.unsqueeze(-1).expand(-1, -1, D)) * w.unsqueeze(-1)).sum(1)
        y = y + torch.einsum("nke,ned,nk->nd", F.one_hot(idx, self.E).to(t.dtype), out, w)
        tokens = torch.arange(t.size(0), device=t.device).repeat_interleave(2)
        chosen = torch.bmm(t[tokens].unsqueeze(1), self.experts[idx.reshape(-1)]).squeeze(1)
        return (y + torch.zeros_like(t).index_add(0, tokens, chosen * w.reshape(-1, 1))).view(B, T, D)

    def token_mixing(self, h):  # causal depthwise conv1d, a one-token shift, cumulative mean, a slice assigned
        c = self.conv(F.pad(h.transpose(1, 2), (3, 0))).transpose(1, 2).clone()
        c[:, :, :4] = h[:, :, :4]
        shifted = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
        n = torch.arange(1, h.size(1) + 1, device=h.device, dtype=h.dtype).view(1, -1, 1)
        return c + shifted + h.cumsum(1) / n

    def forward(self, x):
        h = self.wte(x).to(torch.bfloat16).float()  # a low-precision table, computed in fp32
        B, T, D = h.shape
        gate = 2 * torch.sigmoid(self.ve_gate(h[..., :8]))  # value embeddings, gated per head
        h = h + (gate.unsqueeze(-1) * self.ve(x).view(B, T, self.H, -1)).view(B, T, D)
        h = h + self.gqa(h) + self.manual_attention(h) + self.norms_and_mlp(h) + self.moe(h) + self.token_mixing(h)
        logits = F.linear(F.rms_norm(h, (D,)), self.wte.weight).float()  # tied weights
        return 15 * torch.tanh(logits / 15)  # softcap


def _targets(nodes):
    """The operators an encoded graph calls, its subgraphs' included."""
    return set().union(*[_targets(n["graph"]) if n["op"] == "get_attr" else {n.get("target")} for n in nodes]) - {None}


def test_what_research_edits_export_crosses_over_and_scores_as_in_process(smoke, tmp_path):
    """The allow-list must not block research: each operator the edits export is allowed, and runs."""
    tok = smoke.Tokenizer.from_directory()
    torch.manual_seed(0)
    model = ResearchEdits(tok.get_vocab_size(), smoke.MAX_SEQ_LEN).eval()
    smoke.handover(model, str(tmp_path / "h"))
    meta = json.loads((tmp_path / "h/model.json").read_text())
    assert {f"aten.{name}" for name in ("_unsafe_view.default", "repeat_interleave.self_int", "topk.default",
                                        "scatter.src", "gather.default", "one_hot.default", "index_add.default",
                                        "index.Tensor", "conv1d.default", "cumsum.default", "layer_norm.default",
                                        "where.ScalarOther", "tril.default", "einsum.default", "group_norm.default",
                                        "_native_batch_norm_legit_no_training.default", "slice_scatter.default")
            } <= _targets(meta["graph"])
    forward, _ = smoke.load_handover(str(tmp_path / "h"), torch.device("cpu"), compile_model=False)
    x = torch.from_numpy(next(smoke._eval_rows(tok))[:, :-1].astype(np.int64))
    with torch.no_grad():
        assert torch.allclose(forward(x), model(x), atol=1e-5)


def _on_a_fake_gpu(smoke, monkeypatch, model_of):
    """The operators of the graph export writes for model_of(mode) on a GPU, traced with fake CUDA
    tensors under bf16 autocast as evaluate_bpb is called there; the graph must pass what
    load_handover checks before it runs anything."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)  # autocast("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    mode = FakeTensorMode()
    model = model_of(mode)
    with mode:
        x = torch.zeros((2, smoke.MAX_SEQ_LEN), dtype=torch.long, device="cuda")
    for m in model.modules():  # the weights as fake CUDA tensors of their shapes and types
        for tensors in (m._parameters, m._buffers):
            for k, t in [(k, t) for k, t in tensors.items() if t is not None]:
                with mode:
                    f = torch.empty(t.shape, dtype=t.dtype, device="cuda")
                tensors[k] = torch.nn.Parameter(f, t.requires_grad) if isinstance(t, torch.nn.Parameter) else f
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ep = smoke._export(model.eval(), x)
    nodes = smoke._encode_graph(ep.graph_module)
    smoke._check_operators(nodes)
    gm = smoke._decode_graph(nodes, torch.device("cuda", 0))
    args = [x if spec.kind.name == "USER_INPUT" else {**ep.state_dict, **ep.constants}[spec.target]
            for spec in ep.graph_signature.input_specs]
    values = smoke._fake_values(gm, args, mode)
    smoke._check_shapes(gm, values)
    smoke._bound_flex_attention(gm, values)
    return _targets(nodes)


def test_what_train_py_exports_on_a_gpu_is_allowed(smoke, monkeypatch):
    """The graph export writes on a GPU: train.py's model, with GQA, FlexAttention's block masks in
    the windowed layer and SDPA in the last. Export keeps scaled_dot_product_attention and rms_norm
    whole on a GPU too: SDPA's backend kernels (_scaled_dot_product_flash_attention, _efficient_,
    _cudnn_) and _fused_rms_norm never appear. (ResearchEdits exports the same operators on fake
    CUDA tensors as on the CPU, as found when the list was made: nothing in it depends on the device.)"""
    ns, T = train_py_classes(), smoke.MAX_SEQ_LEN
    ns["LOW_PRECISION"] = torch.bfloat16  # train.py's on a GPU

    def model_of(mode):
        cfg = ns["GPTConfig"](sequence_len=T, vocab_size=smoke.VOCAB_SIZE, n_layer=2, n_head=4, n_kv_head=2,
                              n_embd=64, window_pattern="SL")
        with torch.device("meta"):
            model = ns["GPT"](cfg)
        model.to_empty(device="cpu")
        model.init_weights()
        with mode:
            model.attn_masks = [ns["build_attn_mask"](w, T, torch.device("cuda")) for w in model.window_sizes]
        return model
    targets = _on_a_fake_gpu(smoke, monkeypatch, model_of)
    assert {"aten.scaled_dot_product_attention.default", "aten.rms_norm.default", "higher_order.flex_attention",
            "aten._to_copy.default"} <= targets
    assert not any("_scaled_dot_product" in t or "fused" in t for t in targets)


REFERENCE = os.path.join(ROOT, ".devdata", "reference_train.py")


@pytest.mark.skipif(not os.path.exists(REFERENCE), reason="no .devdata/reference_train.py (tests/gpu_check.sh says how to get it)")
def test_what_the_reference_train_py_exports_on_a_gpu_is_allowed(smoke, monkeypatch, tmp_path):
    """tests/gpu_check.sh runs the reference's train.py (karpathy/autoresearch), its FA3 download
    replaced by SDPA and FlexAttention (tests/gpu_check.py reference), through our evaluator on a
    GPU: its graph, traced as on a GPU, is allowed whole (checked when the list was reviewed:
    nothing was missing)."""
    patched = tmp_path / "reference_train.py"
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_check.py"), "reference", REFERENCE, str(patched)],
                   check=True)
    src = patched.read_text()

    def model_of(mode):
        ns = {"__name__": "reference_classes"}
        with mode:  # its FlexAttention mask is made on "cuda" as the class is defined
            exec(compile(src[:src.index("t_start = time.time()")], str(patched), "exec"), ns)
        cfg = ns["GPTConfig"](sequence_len=smoke.MAX_SEQ_LEN, vocab_size=smoke.VOCAB_SIZE, n_layer=4, n_head=4,
                              n_kv_head=4, n_embd=128, window_pattern="SSSL")
        with torch.device("meta"):
            model = ns["GPT"](cfg)
        model.to_empty(device="cpu")
        model.init_weights()
        return model
    targets = _on_a_fake_gpu(smoke, monkeypatch, model_of)
    assert {"aten.scaled_dot_product_attention.default", "higher_order.flex_attention"} <= targets


@pytest.mark.parametrize("option", [["BLOCK_M'''\nimport os\n'''", 1],
                                    # facts the compiled kernel trusts: no bounds checks, another block size
                                    ["IS_DIVISIBLE", True], ["SPARSE_KV_BLOCK_SIZE", 4096], ["BLOCKS_ARE_CONTIGUOUS", True]])
def test_flex_attention_options_are_flags_and_sizes_only(smoke, tmp_path, option):
    tok = smoke.Tokenizer.from_directory()
    smoke.handover(FlexModel(tok.get_vocab_size(), smoke.MAX_SEQ_LEN).eval(), str(tmp_path / "h"))
    meta = json.loads((tmp_path / "h/model.json").read_text())
    flex = next(n for n in meta["graph"] if n.get("target") == "higher_order.flex_attention")
    flex["args"][6]["dict"].append(option)
    (tmp_path / "h/model.json").write_text(json.dumps(meta))
    with pytest.raises(smoke.PrepareError, match="FlexAttention options"):
        smoke.evaluate_handover(str(tmp_path / "h"))


def test_a_forged_flex_block_mask_reads_nothing_past_the_key(smoke, tmp_path):
    """Found by the third adversarial review: the compiled FlexAttention kernel reads the key blocks
    its block mask names unchecked (eager FlexAttention ignores them). Block 5000 of a 2-block key
    failed on the CPU (block 2: SIGFPE) and reads past the key on a GPU. Now the counts and indices
    are clamped to the blocks there are, and a mask that does not fit its query and key is refused."""
    tok = smoke.Tokenizer.from_directory()
    torch.manual_seed(0)
    model = FlexModel(tok.get_vocab_size(), smoke.MAX_SEQ_LEN).eval()
    d = tmp_path / "h"
    smoke.handover(model, str(d))
    meta = json.loads((d / "model.json").read_text())
    flex = next(n for n in meta["graph"] if n.get("target") == "higher_order.flex_attention")
    mask = flex["args"][4]["tuple"]
    raw = bytearray((d / "model.bin").read_bytes())

    def forge(entry, values):  # the handed-over tensor behind one of the mask's entries
        t = meta["tensors"][meta["inputs"][mask[entry]["node"]]]
        raw[t["offset"]:t["offset"] + t["bytes"]] = np.resize(np.array(values, dtype=np.int32), t["bytes"] // 4).tobytes()
    forge(2, [2]), forge(3, [0, 5000]), forge(4, [0])  # both key blocks "partial", the second at index 5000
    (d / "model.bin").write_bytes(bytes(raw))
    x = torch.from_numpy(next(smoke._eval_rows(tok))[:, :-1].astype(np.int64))
    compiled, _ = smoke.load_handover(str(d), torch.device("cpu"), compile_model=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-4)  # index 5000 is block 1, the last
    mask[0] = smoke.MAX_SEQ_LEN * 2
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(smoke.PrepareError, match="block mask does not fit"):
        smoke.load_handover(str(d), torch.device("cpu"), compile_model=False)


def _body(N, R, T, V, nodes_of):
    body = nodes_of(N, R, T, V)
    return [{"op": "placeholder"}] + body + [{"op": "output", "args": [{"tuple": [N(len(body))]}]}]


@pytest.mark.parametrize("nodes_of, why", [
    # batch norm's statistics of 1 element for T channels: the CPU kernel read T - 1 values past
    # each, a different value each call (logits 5.8e21, nan, 0.001 at one channel)
    pytest.param(lambda N, R, T, V: [
        _call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}), _call("aten.view.default", N(1), [R, T, 1]),
        _call("aten.full.default", [1], 0.0, dtype={"dtype": "float32"}, device={"device": "cpu"}),
        _call("aten.full.default", [1], 1.0, dtype={"dtype": "float32"}, device={"device": "cpu"}),
        _call("aten._native_batch_norm_legit_no_training.default", N(2), None, None, N(3), N(4), 0.1, 1e-5),
        _call("getitem", N(5), 0), _call("aten.expand.default", N(6), [R, T, V])],
        "batch norm", id="batch-norm-statistics-shorter-than-its-channels"),
    # SDPA with a key shorter than its value: the CPU kernel took the value's length and read the
    # key's rows past its end (the heap beyond a tensor of its own: other logits each call)
    pytest.param(lambda N, R, T, V: [
        _call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}), _call("aten.view.default", N(1), [R, 1, T, 1]),
        _call("aten.slice.Tensor", N(2), 2, 0, T // 2), _call("aten.clone.default", N(3)),
        _call("aten.scaled_dot_product_attention.default", N(2), N(4), N(2)),
        _call("aten.view.default", N(5), [R, T, 1]), _call("aten.expand.default", N(6), [R, T, V])],
        "key and value", id="sdpa-key-shorter-than-its-value"),
    # circular padding, negative on one side: the output's regions the kernel never writes held
    # what the allocator left there (7.7e34, 0.0, 1.8e-20 on three calls; nan on the compiled path,
    # which on a GPU is memory freed by earlier batches)
    pytest.param(lambda N, R, T, V: [
        _call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}), _call("aten.view.default", N(1), [R, 1, T]),
        _call("aten.pad.default", N(2), [T - 2, 2 - T], "circular"),
        _call("aten.view.default", N(3), [R, T, 1]), _call("aten.expand.default", N(4), [R, T, V])],
        "negative", id="circular-padding-negative-on-one-side"),
    # defence in depth, not a finding: _fused_rms_norm's CPU form broadcasts a weight of 1 element
    # (its CUDA kernel, which no test here watches, gets the weight's shape checked all the same)
    pytest.param(lambda N, R, T, V: [
        _call("aten._to_copy.default", N(0), dtype={"dtype": "float32"}), _call("aten.view.default", N(1), [R, 1, T]),
        _call("aten.full.default", [1], 2.0, dtype={"dtype": "float32"}, device={"device": "cpu"}),
        _call("aten._fused_rms_norm.default", N(2), [T], N(3), 1e-5), _call("getitem", N(4), 0),
        _call("aten.view.default", N(5), [R, T, 1]), _call("aten.expand.default", N(6), [R, T, V])],
        "normalized shape", id="fused-rms-norm-weight-shorter-than-its-shape"),
])
def test_kernels_that_trust_their_operands_shapes_get_shapes_that_fit(smoke, tmp_path, nodes_of, why):
    """Found by the fourth adversarial review, through operators on the allow-list: each kernel takes
    one operand's size for another's, or leaves part of its output unwritten, and the logits read
    memory that is neither the inputs nor the weights. The evaluator now checks the shapes, on
    tensors without data, before anything runs."""
    nodes = _body(lambda i: {"node": i}, smoke.EVAL_ROWS, smoke.MAX_SEQ_LEN, smoke.VOCAB_SIZE, nodes_of)
    with pytest.raises(smoke.PrepareError, match=why):
        smoke.evaluate_handover(_graph(smoke, tmp_path, nodes))


class FlexBias(torch.nn.Module):
    """FlexAttention with a score_mod that reads a buffer of its own: a bias per key position."""

    def __init__(self, V, T):
        super().__init__()
        from torch.nn.attention.flex_attention import create_block_mask
        self.emb, self.out = torch.nn.Embedding(V, 64), torch.nn.Linear(64, V, bias=False)
        self.register_buffer("bias", torch.randn(T))
        self.shift = 0  # the score_mod reads bias[(key + shift) % T]
        self.mask = create_block_mask(lambda b, h, q, k: k <= q, None, None, T, T, device="cpu")

    def forward(self, x):
        from torch.nn.attention.flex_attention import flex_attention
        T, bias = x.size(1), self.bias
        h = self.emb(x).view(x.size(0), T, 4, 16).transpose(1, 2)
        y = flex_attention(h, h.flip(-1), h * 0.5, block_mask=self.mask,
                           score_mod=lambda s, b, hh, q, k: s + bias[(k + self.shift) % T])
        return self.out(y.transpose(1, 2).reshape(x.size(0), T, 64)).float()


def _edit_graph(smoke, d, edit):
    """A hand-over's graph, changed by edit(gm, flex_node) as FX graph code, written back."""
    meta = json.loads((d / "model.json").read_text())
    gm = smoke._decode_graph(meta["graph"], torch.device("cpu"))
    edit(gm, next(n for n in gm.graph.nodes if n.target is torch.ops.higher_order.flex_attention))
    meta["graph"] = smoke._encode_graph(gm)
    (d / "model.json").write_text(json.dumps(meta))


def test_flex_attention_score_and_mask_mods_read_their_buffers_within_bounds(smoke, tmp_path):
    """Found by the fourth adversarial review, in Inductor's source (no GPU to watch it): on a GPU,
    Inductor inlines score_mod and mask_mod into FlexAttention's Triton kernel, where a load from a
    buffer they read at a computed index has no bounds check and no wrap of a negative index
    (select_algorithm.py's ModificationWrapper drops both; pytorch/pytorch#150321): bias[key + 10**6]
    loads GPU memory 4 MB past the buffer, whatever an earlier batch left there (the CPU evaluator
    raised IndexError, a crash). Now every index a mod uses is wrapped into its dimension in the graph
    (a true one is unchanged), and the mods may use elementwise operations, views and tensor[index]
    alone: no gather, embedding, index_select..."""
    tok = smoke.Tokenizer.from_directory()
    torch.manual_seed(0)
    model, d = FlexBias(tok.get_vocab_size(), smoke.MAX_SEQ_LEN).eval(), tmp_path / "h"
    smoke.handover(model, str(d))

    def past_the_buffer(gm, flex):  # bias[(key + shift) % T] becomes bias[key + 10**6]
        sub = getattr(gm, flex.args[3].target)
        index = next(n for n in sub.graph.nodes if n.target is torch.ops.aten.index.Tensor)
        kv = [n for n in sub.graph.nodes if n.op == "placeholder"][4]
        with sub.graph.inserting_before(index):
            index.args = (index.args[0], [sub.graph.call_function(torch.ops.aten.add.Tensor, (kv, 10 ** 6))])
        sub.graph.eliminate_dead_code()
        sub.recompile()
    _edit_graph(smoke, d, past_the_buffer)
    forward, _ = smoke.load_handover(str(d), torch.device("cpu"), compile_model=False)
    x = torch.from_numpy(next(smoke._eval_rows(tok))[:, :-1].astype(np.int64))
    model.shift = 10 ** 6
    with torch.no_grad():
        assert torch.allclose(forward(x), model(x), atol=1e-5)  # wrapped: key + 10**6 mod T

    def gather(gm, flex):  # the same read through index_select, which the mods may not use
        sub = getattr(gm, flex.args[3].target)
        index = next(n for n in sub.graph.nodes if n.target is torch.ops.aten.index.Tensor)
        with sub.graph.inserting_before(index):
            i = sub.graph.call_function(torch.ops.aten.unsqueeze.default, (index.args[1][0], 0))
            picked = sub.graph.call_function(torch.ops.aten.index_select.default, (index.args[0], 0, i))
            index.replace_all_uses_with(sub.graph.call_function(torch.ops.aten.squeeze.dim, (picked, 0)))
        sub.graph.erase_node(index)
        sub.recompile()
    smoke.handover(model, str(d))
    _edit_graph(smoke, d, gather)
    with pytest.raises(smoke.PrepareError, match="score_mod and mask_mod may use"):
        smoke.load_handover(str(d), torch.device("cpu"), compile_model=False)


def test_flex_attention_gets_a_key_and_value_that_fit_each_other(smoke, tmp_path):
    """Found by the fourth adversarial review, in Inductor's source (no GPU to watch it): its
    FlexAttention kernel for a GPU takes the batch and the length from the key and the heads from the
    value, and reads both with them (flex_attention.py.jinja: v_offset = off_zkv * stride_vz, off_zkv
    from the key's batch), while eager FlexAttention, the CPU evaluator's, broadcasts a value of batch
    1: the kernel reads 8 batches of it, 7 past its end. Now query, key and value must fit: 4-D, key
    and value of the same batch, heads and length, query and key of the same width, the query's
    heads a multiple of the key's."""
    tok = smoke.Tokenizer.from_directory()
    d = tmp_path / "h"
    smoke.handover(FlexModel(tok.get_vocab_size(), smoke.MAX_SEQ_LEN).eval(), str(d))

    def value_of_batch_1(gm, flex):
        with gm.graph.inserting_before(flex):
            v = gm.graph.call_function(torch.ops.aten.slice.Tensor, (flex.args[2], 0, 0, 1))
            v = gm.graph.call_function(torch.ops.aten.clone.default, (v,))
        flex.args = (*flex.args[:2], v, *flex.args[3:])
        gm.recompile()
    _edit_graph(smoke, d, value_of_batch_1)
    with pytest.raises(smoke.PrepareError, match="query, key and value do not fit"):
        smoke.load_handover(str(d), torch.device("cpu"), compile_model=False)


def test_flex_attention_outputs_beside_the_attention_are_written_before_they_are_read(smoke, tmp_path, monkeypatch):
    """Found by the fourth adversarial review, in Inductor's source (no GPU to watch it): on a GPU,
    Inductor's FlexAttention returns its logsumexp and its row maxima in buffers it allocates
    uninitialised (empty_strided) and writes only when the kernel options OUTPUT_LOGSUMEXP and
    OUTPUT_MAX say so, and export writes both False under no_grad: a graph that reads them reads
    whatever the allocator left there, freed logits or inputs of an earlier call included (on the
    CPU, eager FlexAttention computes them). Now a graph that reads them gets them written: what
    the compiler is given says so."""
    import operator
    tok = smoke.Tokenizer.from_directory()
    d = tmp_path / "h"
    smoke.handover(FlexModel(tok.get_vocab_size(), smoke.MAX_SEQ_LEN).eval(), str(d))

    def read_lse_and_max(gm, flex):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        logits = out.args[0][0]
        with gm.graph.inserting_before(out):
            extra = [gm.graph.call_function(torch.ops.aten.sum.default, (gm.graph.call_function(operator.getitem, (flex, i)),))
                     for i in (1, 2)]
            total = gm.graph.call_function(torch.ops.aten.add.Tensor, tuple(extra))
            logits = gm.graph.call_function(torch.ops.aten.add.Tensor, (logits, gm.graph.call_function(
                torch.ops.aten.mul.Tensor, (total, 0.0))))
        out.args = ((logits,),)
        gm.recompile()
    _edit_graph(smoke, d, read_lse_and_max)
    given = []
    monkeypatch.setattr(torch._inductor, "compile", lambda gm, args: given.append(gm) or gm)
    smoke.load_handover(str(d), torch.device("cpu"), compile_model=True)
    flex = next(n for n in given[0].graph.nodes if n.target is torch.ops.higher_order.flex_attention)
    assert flex.args[6]["OUTPUT_LOGSUMEXP"] is True and flex.args[6]["OUTPUT_MAX"] is True


def test_the_causality_checks_continuations_come_from_the_whole_vocabulary(smoke, monkeypatch):
    """Found by the fourth adversarial review: the scored batches' check drew its random tokens from
    range(logits.size(-1)), which the model chooses: logits shaped [rows, T, V/2, 2] score the same
    and made every continuation tokens 0 and 1, easy to tell from text. Now the vocabulary is the
    tokenizer's."""
    import itertools
    tok = smoke.Tokenizer.from_directory()
    V, drawn = tok.get_vocab_size(), []
    monkeypatch.setattr(smoke, "check_causal", lambda forward, rows, vocab_size, logits, rng: drawn.append(vocab_size))
    token_bytes = torch.from_numpy(tok.token_byte_lengths())
    smoke._score(lambda x: torch.zeros(*x.shape, V // 2, 2), itertools.islice(smoke._eval_rows(tok), 2), token_bytes, 1.0)
    assert drawn == [V, V]


class SparseLookahead(torch.nn.Module):
    """Looks at the next token only where the current token is 0 mod 5: a pure function that no
    single cut per row is sure to catch."""

    def __init__(self, V):
        super().__init__()
        self.now, self.next = torch.nn.Embedding(V, V), torch.nn.Embedding(V, V)

    def forward(self, x):
        gate = (x % 5 == 0).unsqueeze(-1).float()
        return self.now(x) + gate * self.next(x.roll(-1, dims=1))


def test_a_look_ahead_at_a_few_positions_is_found_in_the_scored_batches(smoke, tmp_path):
    tok = smoke.Tokenizer.from_directory()
    smoke.handover(SparseLookahead(tok.get_vocab_size()), str(tmp_path / "h"))
    with pytest.raises(smoke.PrepareError, match="the model looks ahead"):
        smoke.evaluate_handover(str(tmp_path / "h"))


def test_a_model_whose_logits_change_from_call_to_call_is_refused(smoke, tmp_path, monkeypatch):
    """Defence in depth behind the refused operators: the first batch is scored twice, and must get
    the same logits both times."""
    tok = smoke.Tokenizer.from_directory()
    V, calls = tok.get_vocab_size(), [0]

    def counting(x):  # causal, but its answers drift with the number of calls
        calls[0] += 1
        return torch.zeros(*x.shape, V) + (calls[0] > 2) * torch.nn.functional.one_hot(x, V).float()
    monkeypatch.setattr(smoke, "load_handover", lambda d, device, compile_model: (counting, 0))
    with pytest.raises(smoke.PrepareError, match="other logits for the same batch"):
        smoke.evaluate_handover(str(tmp_path))

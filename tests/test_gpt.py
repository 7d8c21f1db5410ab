"""gpt.py: parity with transformers reference outputs (tests/fixtures, made by make_fixtures.py),
fused loss, one-pass property, save/load round trips, bad input, downloads from a loopback server."""
import hashlib, http.server, json, os, pathlib, shutil, socket, sys, threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "gpt.py").exists())
sys.path.insert(0, str(ROOT))
from gpt import (GPT, CheckpointError, DownloadError, GPTConfig, download, fused_lm_loss, load_tokenizer,  # noqa: E402
                 read_safetensors, resolve_model_dir, write_safetensors)

FIX = ROOT / "tests" / "fixtures"
PARITY = [("gpt2", "gpt2"), ("gpt2_hub", "gpt2"), ("opt", "opt"), ("opt350", "opt350"), ("opt350_hub", "opt350"),
          ("opt350_bf16", "opt350")]


def _gpt_ref(name):
    return {k: torch.from_numpy(v) for k, v in np.load(FIX / f"{name}_ref.npz").items()}


def _gpt_tiny(model_type="gpt2", **kw):
    torch.manual_seed(0)
    opt = model_type == "opt"
    cfg = dict(model_type=model_type, vocab_size=61, block_size=48, n_layer=2, n_head=2, n_embd=16,
               activation="relu" if opt else "gelu_new", word_embed_proj_dim=8 if opt else 0, pre_ln=not opt)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("folder,ref", PARITY)
def test_gpt_parity_with_transformers(folder, ref):
    r, m = _gpt_ref(ref), GPT.from_pretrained(FIX / folder).eval()
    real = r["attention_mask"].bool()
    with torch.no_grad():
        d_logits = (m.lm_logits(r["input_ids"], r["attention_mask"]) - r["logits"])[real].abs().max().item()
        d_hidden = (m.hidden_states(r["input_ids"], r["attention_mask"]) - r["last_hidden_state"])[real].abs().max().item()
        assert d_logits < 1e-4 and d_hidden < 1e-4, (d_logits, d_hidden)
        if m.score is not None:  # seq-cls checkpoints: HF `score` pooled at the last non-pad token
            assert m.config.num_labels == r["cls_logits"].shape[1]
            assert (m.classify(r["input_ids"], r["attention_mask"]) - r["cls_logits"]).abs().max() < 1e-4
        assert torch.equal(m.generate(r["gen1_input_ids"], 12), r["gen1_output"])
        genb = m.generate(r["genb_input_ids"], 12, attention_mask=r["genb_attention_mask"])  # left-padded batch
        assert torch.equal(genb, r["genb_output"])
        m.config.pad_token_id = int(r["genb_input_ids"][2, 0])  # the pad the reference used (hub config has none)
        eos = m.generate(r["genb_input_ids"], 12, attention_mask=r["genb_attention_mask"], eos_token_id=int(r["gen_eos_id"]))
        assert torch.equal(eos, r["gen_eos_output"][:, :eos.shape[1]])  # HF pads finished rows


def test_gpt_hub_layout_has_buffers_and_bare_keys():
    keys = set(read_safetensors(FIX / "gpt2_hub" / "model.safetensors"))
    assert "wte.weight" in keys and any(k.endswith("attn.bias") for k in keys)  # the case the loader must handle
    assert (FIX / "opt350_hub" / "model.safetensors.index.json").exists()


def test_gpt_fused_lm_loss_equals_naive():
    torch.manual_seed(0)
    h = torch.randn(3, 11, 16, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(50, 16).requires_grad_()
    t = torch.randint(0, 50, (3, 11))
    t[0, :4] = -100
    t[2, 7:] = -100
    for chunk in (1, 5, 1024):
        loss = fused_lm_loss(h, w, t, chunk=chunk)
        gh, gw = torch.autograd.grad(loss, [h, w])
        ref = F.cross_entropy((h @ w.t()).view(-1, 50), t.view(-1), ignore_index=-100)
        rh, rw = torch.autograd.grad(ref, [h, w])
        assert abs(loss.item() - ref.item()) < 1e-5
        assert (gh - rh).abs().max() < 1e-5 and (gw - rw).abs().max() < 1e-5
    zero = fused_lm_loss(h, w, torch.full_like(t, -100))
    assert zero.item() == 0.0 and zero.requires_grad
    with torch.no_grad():
        assert abs(fused_lm_loss(h, w, t).item() - ref.item()) < 1e-5


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_gpt_forward_one_pass_property(model_type):
    """Class logits at the last token of x are the same for [x] and [x, rationale] (paper §3), in one batch
    with right padding, for both heads and poolings; and loss_lm equals the naive full-logits loss."""
    for head, pooling in [("linear", "last"), ("mlp", "mean")]:
        m = _gpt_tiny(model_type, num_labels=3, head=head, pooling=pooling)
        torch.manual_seed(1)
        idx = torch.randint(0, 61, (2, 20))
        am = torch.ones_like(idx)
        am[1, 14:] = 0
        x_len = torch.tensor([9, 6])
        tg = torch.cat([idx[:, 1:], torch.full((2, 1), -100)], 1).masked_fill(am == 0, -100)
        cls, loss = m(idx, am, x_len=x_len, lm_targets=tg)
        alone = torch.cat([m.classify(idx[b:b + 1, :x_len[b]]) for b in range(2)])
        assert (cls - alone).abs().max() < 1e-5
        naive = F.cross_entropy(m.lm_logits(idx, am).view(-1, 61), tg.view(-1), ignore_index=-100)
        assert abs(loss.item() - naive.item()) < 1e-5
        loss.backward()


def test_gpt_sampling_and_cache_match_recompute():
    m = _gpt_tiny("opt")
    p = torch.randint(0, 61, (1, 5))
    x = p
    for _ in range(8):  # greedy without a cache
        x = torch.cat([x, m.lm_logits(x)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(m.generate(p, 8), x)
    assert torch.equal(m.generate(p, 8, temperature=1.0, top_p=1e-9), x)  # nucleus of one token = greedy
    g = lambda: torch.Generator().manual_seed(3)
    a, b = m.generate(p, 8, temperature=1.0, generator=g()), m.generate(p, 8, temperature=1.0, generator=g())
    assert torch.equal(a, b) and a.shape == (1, 13)


def test_gpt_bf16_autocast_cpu():
    m = _gpt_tiny("gpt2", num_labels=2)
    idx = torch.randint(0, 61, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls, loss = m(idx, lm_targets=idx)
        loss.backward()
        out = m.generate(idx[:, :4], 3)
    assert torch.isfinite(loss) and cls.shape == (2, 2) and out.shape == (2, 7)
    assert m.wte.weight.grad is not None and m.wte.weight.grad.dtype == torch.float32


def test_gpt_optimizer_groups_and_flops():
    m = _gpt_tiny("gpt2")
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert m.flops_per_token(32) > 6 * sum(p.numel() for p in m.parameters()) - 6 * m.wpe.weight.numel()


@pytest.mark.parametrize("folder", ["gpt2", "opt350", "opt350_hub"])
def test_gpt_save_pretrained_round_trip(folder, tmp_path):
    m = GPT.from_pretrained(FIX / folder).eval()
    m.save_pretrained(tmp_path / "m", labels=["a", "b", "c"] if m.score is not None else None)
    m2 = GPT.from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, m.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(m.lm_logits(idx), m2.lm_logits(idx))
        if m.score is not None:
            assert torch.equal(m.classify(idx), m2.classify(idx))
    assert (tmp_path / "m" / "vocab.json").read_bytes() == (FIX / folder / "vocab.json").read_bytes()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == m.config.model_type and (m.score is None or cfg["id2label"]["2"] == "c")
    keys = set(read_safetensors(tmp_path / "m" / "model.safetensors"))
    assert any(k.startswith(("transformer.h.0.", "model.decoder.layers.0.")) for k in keys)


def test_gpt_mlp_head_and_new_head(tmp_path):
    with pytest.raises(CheckpointError, match="unexpected.*score.weight"):  # a linear checkpoint head vs head=mlp
        GPT.from_pretrained(FIX / "opt", head="mlp")
    m = GPT.from_pretrained(FIX / "opt350_bf16", num_labels=4, head="mlp")
    assert m.classify(torch.tensor([[5, 6, 7]])).shape == (1, 4)
    m.save_pretrained(tmp_path / "mlp")
    m2 = GPT.from_pretrained(tmp_path / "mlp")
    assert m2.config.head == "mlp" and torch.equal(m.classify(torch.tensor([[5, 6]])), m2.classify(torch.tensor([[5, 6]])))
    with pytest.raises(CheckpointError, match="labels"):
        GPT.from_pretrained(FIX / "gpt2", num_labels=5)


def test_gpt_tokenizer_matches_transformers():
    cases = json.loads((FIX / "tokenizer_cases.json").read_text())
    for name in ("tok_gpt2", "tok_opt"):
        tok, info = load_tokenizer(FIX / name), cases["tokenizers_info"][name]
        assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (info["eos_id"], info["pad_id"], info["len"])
        assert tok.bos_id == (2 if name == "tok_opt" else None)  # HF prepends </s> for OPT, nothing for GPT-2
        for c in cases["cases"]:
            assert tok.encode(c["text"]) == c[name], (name, c["text"])
            assert tok.decode(c[name]) == c["text"]

def test_gpt_bad_tokenizer_files(tmp_path):
    d = _gpt_copy(tmp_path, "tok_gpt2")
    lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
    (d / "merges.txt").write_text("\n".join(lines[:3] + ["a b c"] + lines[4:]), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"merges.txt:4: .*'a b c'"):
        load_tokenizer(d)
    (d / "vocab.json").write_text("{bad")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_tokenizer(d)
    (d / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="vocab.json: missing"):
        load_tokenizer(d)

# -- bad input --------------------------------------------------------------------------------


def _gpt_st(header, data=b"", n=None):
    h = json.dumps(header).encode()
    return (len(h) if n is None else n).to_bytes(8, "little") + h + data


BAD_FILES = [
    (b"\x01\x02", "too short"),
    ((10 ** 9).to_bytes(8, "little") + b"{}", "past the end"),
    (_gpt_st({}, n=4) + b"xx", "not a JSON object"),
    (_gpt_st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"1234"), "outside"),
    (_gpt_st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"12345678"), "'b' overlaps"),
    (_gpt_st({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}, "z": {"dtype": "U8", "shape": [0], "data_offsets": [1, 1]},
              "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, b"12345678"), "'b' overlaps"),
    (_gpt_st({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, b"1234"), "unsupported dtype"),
    (_gpt_st({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"12345678"), "does not fit its 8 bytes"),
    (_gpt_st({"a": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}, b"1234"), "malformed"),
    (_gpt_st([1, 2]), "not a JSON object"),
]


@pytest.mark.parametrize("data,msg", BAD_FILES)
def test_gpt_bad_safetensors(tmp_path, data, msg):
    f = tmp_path / "model.safetensors"
    f.write_bytes(data)
    with pytest.raises(CheckpointError, match=msg) as e:
        read_safetensors(f)
    assert str(f) in str(e.value)


def test_gpt_safetensors_dtypes_round_trip(tmp_path):
    ts = {"f32": torch.randn(3, 2), "f16": torch.randn(4).half(), "bf16": torch.randn(2, 2).bfloat16(),
          "i64": torch.arange(5), "empty": torch.zeros(0, 3), "scalar": torch.tensor(1.5)}
    write_safetensors(tmp_path / "t.safetensors", ts)
    back = read_safetensors(tmp_path / "t.safetensors")
    assert set(back) == set(ts) and all(torch.equal(back[k], ts[k]) and back[k].dtype == ts[k].dtype for k in ts)


def _gpt_copy(tmp_path, folder="gpt2"):
    d = tmp_path / folder
    shutil.copytree(FIX / folder, d)
    return d


def test_gpt_bad_checkpoints(tmp_path):
    d = _gpt_copy(tmp_path)
    st = read_safetensors(d / "model.safetensors")
    cases = []
    cases.append(({**st, "transformer.h.9.mlp.c_fc.weight": torch.zeros(1)}, "unexpected.*h.9"))
    cases.append(({k: v for k, v in st.items() if "ln_f" not in k}, "missing.*ln_f"))
    bad = dict(st)
    bad["transformer.wpe.weight"] = torch.zeros(7, 32)
    cases.append((bad, r"wpe.weight has shape \[7, 32\]"))
    for tensors, msg in cases:
        write_safetensors(d / "model.safetensors", tensors)
        with pytest.raises(CheckpointError, match=msg):
            GPT.from_pretrained(d)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])  # truncated download
    with pytest.raises(CheckpointError, match="model.safetensors"):
        GPT.from_pretrained(d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pickle is never loaded"):
        GPT.from_pretrained(d)
    for text, msg in [('{"model_type": "llama"}', "model_type 'llama' is not supported"), ("{nope", "not a JSON"),
                      ('{"model_type": "gpt2", "n_embd": 30, "n_head": 4}', "invalid field"),
                      ('{"model_type": "opt", "hidden_size": "big"}', "wrong type|invalid")]:
        (d / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=msg) as e:
            GPT.from_pretrained(d)
        assert "config.json" in str(e.value)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        GPT.from_pretrained(d)
    with pytest.raises(CheckpointError, match="no such folder"):
        GPT.from_pretrained(str(tmp_path / "nope" / "x"))


def test_gpt_bad_sharded_index(tmp_path):
    d = _gpt_copy(tmp_path, "opt350_hub")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors is missing"):
        GPT.from_pretrained(d)
    idx["weight_map"] = {k: "../evil.safetensors" for k in idx["weight_map"]}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="index"):
        GPT.from_pretrained(d)

# -- downloads against a loopback server ---------------------------------------------------------


class _GPTHandler(http.server.BaseHTTPRequestHandler):
    files = {}  # url path -> bytes
    hits = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.hits.append((self.path, self.headers.get("Range")))
        body = self.files.get(self.path)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        if start >= len(body) and start:
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])


@pytest.fixture
def _gpt_server():
    _GPTHandler.files, _GPTHandler.hits = {}, []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GPTHandler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_gpt_download_resume_and_checks(_gpt_server, tmp_path):
    body = os.urandom(300_000)
    _GPTHandler.files["/f.bin"] = body
    sha = hashlib.sha256(body).hexdigest()
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(body[:123_456])  # an interrupted earlier download
    download(f"{_gpt_server}/f.bin", dest, expected_size=len(body), sha256=sha)
    assert dest.read_bytes() == body and not (tmp_path / "f.bin.part").exists()
    assert _GPTHandler.hits[-1] == ("/f.bin", "bytes=123456-")
    with pytest.raises(DownloadError, match="expected 999"):
        download(f"{_gpt_server}/f.bin", tmp_path / "g.bin", expected_size=999)
    assert not (tmp_path / "g.bin").exists() and not (tmp_path / "g.bin.part").exists()
    with pytest.raises(DownloadError, match="sha256"):
        download(f"{_gpt_server}/f.bin", tmp_path / "h.bin", sha256="0" * 64)
    assert not (tmp_path / "h.bin").exists() and not (tmp_path / "h.bin.part").exists()
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{_gpt_server}/missing", tmp_path / "m.bin")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here: looks offline
    with pytest.raises(DownloadError, match=f"127.0.0.1:{port}/x.*local folder"):
        download(f"http://127.0.0.1:{port}/x", tmp_path / "x.bin")


def _gpt_serve_repo(name, folder, with_api=True):
    tree = []
    for f in sorted(folder.iterdir()):
        body = f.read_bytes()
        _GPTHandler.files[f"/{name}/resolve/main/{f.name}"] = body
        tree.append({"type": "file", "path": f.name, "size": len(body)} if f.suffix != ".safetensors" else
                    {"type": "file", "path": f.name, "size": 134, "lfs": {"oid": hashlib.sha256(body).hexdigest(), "size": len(body)}})
    if with_api:
        _GPTHandler.files[f"/api/models/{name}/tree/main"] = json.dumps(tree).encode()


def test_gpt_hub_names_resolve_into_cache(_gpt_server, tmp_path, monkeypatch):
    monkeypatch.setenv("DHRD_HUB_URL", _gpt_server)
    monkeypatch.setenv("DHRD_CACHE", str(tmp_path / "cache"))
    _gpt_serve_repo("tiny/gpt2", FIX / "gpt2_hub")
    _gpt_serve_repo("tiny/opt350", FIX / "opt350_hub", with_api=False)  # plain file server: no listing
    r = _gpt_ref("gpt2")
    m = GPT.from_pretrained("tiny/gpt2").eval()
    assert (m.lm_logits(r["input_ids"][:1, :r["lengths"][0]]) - r["logits"][:1, :r["lengths"][0]]).abs().max() < 1e-4
    assert resolve_model_dir("tiny/gpt2") == tmp_path / "cache" / "tiny--gpt2"
    n = len(_GPTHandler.hits)
    assert load_tokenizer("tiny/gpt2").encode("Hello") == load_tokenizer(FIX / "gpt2_hub").encode("Hello")
    assert len(_GPTHandler.hits) == n  # second use: served from the cache, no network
    m = GPT.from_pretrained("tiny/opt350").eval()  # sharded, fp16, found without the tree API
    r = _gpt_ref("opt350")
    assert (m.lm_logits(r["input_ids"][:1, :r["lengths"][0]]) - r["logits"][:1, :r["lengths"][0]]).abs().max() < 1e-4
    _GPTHandler.files["/api/models/tiny/pickle/tree/main"] = json.dumps(
        [{"type": "file", "path": "config.json"}, {"type": "file", "path": "pytorch_model.bin", "size": 9}]).encode()
    for f in ("config.json", "vocab.json", "merges.txt"):
        _GPTHandler.files[f"/tiny/pickle/resolve/main/{f}"] = (FIX / "gpt2" / f).read_bytes()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        GPT.from_pretrained("tiny/pickle")
    with pytest.raises(CheckpointError, match="tiny/absent: no such local folder.*404"):
        GPT.from_pretrained("tiny/absent")

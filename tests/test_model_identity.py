"""Model identity from content: the loaded backbone weights' hash (not the file's name), the
head's tensors, preprocessing and dtype; weights hashed once per file version."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from comfy_nearid import load_model
from comfy_nearid import fileio
from comfy_nearid.weights import resolve_backbone_weights
from comfy_nearid.backbones import get_backbone_spec


def _weights_file(path, seed):
    model = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32", seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.backbone.trunk.state_dict().items()}, str(path))
    return path


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_weights_under_two_names_share_an_identity_other_weights_never(tmp_path):
    a = _weights_file(tmp_path / "one" / "weights.safetensors", seed=1)
    renamed = tmp_path / "two" / "renamed.safetensors"
    renamed.parent.mkdir()
    shutil.copyfile(a, renamed)
    other = _weights_file(tmp_path / "three" / "weights.safetensors", seed=2)  # same name, other content
    m_a = load_model(backbone="tiny-siglip", backbone_weights=a, device="cpu", dtype="fp32")
    m_renamed = load_model(backbone="tiny-siglip", backbone_weights=renamed, device="cpu", dtype="fp32")
    m_other = load_model(backbone="tiny-siglip", backbone_weights=other, device="cpu", dtype="fp32")
    assert m_a.identity == m_renamed.identity
    assert m_a.identity != m_other.identity
    assert f"weights=sha256:{_sha(a)}" in m_a.identity
    assert f"weights=sha256:{_sha(other)}" in m_other.identity
    assert "weights.safetensors" not in m_a.identity and "renamed" not in m_renamed.identity
    # a head with other tensors is another identity; the same tensors loaded twice are not
    head_file = m_a.save_head(tmp_path / "head.safetensors")
    again = load_model(head=head_file, backbone_weights=renamed, device="cpu", dtype="fp32")
    assert again.identity == m_a.identity
    torch.manual_seed(5)
    m_a.head.reset_parameters()
    m_a.invalidate_identity()
    assert m_a.identity != again.identity


def test_auto_located_weights_are_identified_by_their_content(tmp_path):
    spec = get_backbone_spec("mobilenet-v2")
    found = resolve_backbone_weights(spec)  # the offline weights package
    auto = load_model(backbone="mobilenet-v2", device="cpu", dtype="fp32", readout="mean")
    copy = tmp_path / "my-mobilenet.pth"
    shutil.copyfile(found, copy)
    explicit = load_model(backbone="mobilenet-v2", backbone_weights=copy, device="cpu", dtype="fp32", readout="mean")
    assert f"weights=sha256:{_sha(found)}" in auto.identity
    assert auto.identity == explicit.identity


def test_weights_are_hashed_once_per_file_version(tmp_path, monkeypatch):
    monkeypatch.setenv("NEARID_HASH_MEMO", str(tmp_path / "cache" / "file_hashes.json"))
    monkeypatch.setattr(fileio, "_memo", {})
    path = tmp_path / "w.bin"
    path.write_bytes(b"first version")
    assert fileio.file_sha256(path) == hashlib.sha256(b"first version").hexdigest()
    memo_file = tmp_path / "cache" / "file_hashes.json"
    memo = json.loads(memo_file.read_text())
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    assert memo == {key: hashlib.sha256(b"first version").hexdigest()}
    # a new process (empty in-memory memo) trusts the remembered digest for the same
    # (path, size, mtime): proven by a planted digest coming back without the file being read
    memo_file.write_text(json.dumps({key: "ab" * 32}))
    monkeypatch.setattr(fileio, "_memo", {})
    assert fileio.file_sha256(path) == "ab" * 32
    # a changed file (other size and mtime) is hashed again and replaces the old entry
    path.write_bytes(b"second, longer version")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fileio.file_sha256(path) == hashlib.sha256(b"second, longer version").hexdigest()
    assert len(json.loads(memo_file.read_text())) == 1

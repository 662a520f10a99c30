"""push_to_hub against a local fake Hub server (no network)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest
import torch
import yaml

TOKEN = "hf_dummy_token_for_tests"


class FakeHub:
    """In-memory model repos: ``{repo_id: {"sha": str, "files": {path: bytes}, "private": bool}}``."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.unknown: list[str] = []
        self.card_metadata: list[dict] = []
        self.lock = threading.Lock()


def _make_handler(hub: FakeHub, base_url: list[str]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output quiet
            pass

        # -- helpers -------------------------------------------------------------------------
        def _send(self, status, body=b"", headers=None, content_type="application/json"):
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status, code, message):
            self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {TOKEN}"

        def _repo(self, repo_id):
            return hub.repos.get(repo_id)

        # -- routes --------------------------------------------------------------------------
        def do_POST(self):
            path = urlsplit(self.path).path
            body = self._body()
            if path == "/api/repos/create":
                if not self._authorized():
                    return self._error(401, "Unauthorized", "Invalid credentials")
                payload = json.loads(body)
                repo_id = f"{payload['organization']}/{payload['name']}"
                with hub.lock:
                    if repo_id in hub.repos:
                        return self._send(409, {"error": "You already created this model repo",
                                                "url": f"{base_url[0]}/{repo_id}"})
                    hub.repos[repo_id] = {"sha": "0" * 40, "files": {},
                                          "private": payload.get("visibility") == "private"}
                return self._send(200, {"url": f"{base_url[0]}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":
                # the real Hub validates the README metadata block; check it parses to a mapping
                content = json.loads(body)["content"]
                m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
                try:
                    meta = yaml.safe_load(m.group(1)) if m else {}
                except yaml.YAMLError as exc:
                    return self._send(400, {"errors": [{"message": str(exc)}]})
                if not isinstance(meta, dict):
                    return self._send(400, {"errors": [{"message": "metadata must be a mapping"}]})
                hub.card_metadata.append(meta)
                return self._send(200, {"warnings": []})
            m = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)$", path)
            if m:
                repo_id, action = m.group(1), m.group(2)
                if not self._authorized():
                    return self._error(401, "Unauthorized", "Invalid credentials")
                repo = self._repo(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository not found")
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                        for f in files]})
                with hub.lock:
                    summary = ""
                    for line in body.decode().splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        if item["key"] == "header":
                            summary = item["value"].get("summary", "")
                        elif item["key"] == "file":
                            value = item["value"]
                            assert value["encoding"] == "base64"
                            repo["files"][value["path"]] = base64.b64decode(value["content"])
                        elif item["key"] == "deletedFile":
                            repo["files"].pop(item["value"]["path"], None)
                        else:
                            return self._error(400, "BadRequest", f"unsupported commit op {item['key']}")
                    digest = hashlib.sha1(repo["sha"].encode() + summary.encode())
                    for name in sorted(repo["files"]):
                        digest.update(name.encode() + repo["files"][name])
                    repo["sha"] = digest.hexdigest()
                return self._send(200, {"commitUrl": f"{base_url[0]}/{repo_id}/commit/{repo['sha']}",
                                        "commitOid": repo["sha"], "success": True})
            hub.unknown.append(f"POST {path}")
            return self._error(404, "NotFound", f"unknown route {path}")

        def do_GET(self):
            path = unquote(urlsplit(self.path).path)
            m = re.match(r"^/api/models/([^/]+/[^/]+?)(?:/revision/(.+))?$", path)
            if m:
                repo = self._repo(m.group(1))
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository not found")
                return self._send(200, {
                    "id": m.group(1), "modelId": m.group(1), "sha": repo["sha"], "private": repo["private"],
                    "siblings": [{"rfilename": name} for name in sorted(repo["files"])], "tags": [],
                })
            m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", path)
            if m:
                repo = self._repo(m.group(1))
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository not found")
                prefix = (m.group(3) or "").strip("/")
                entries = [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in sorted(repo["files"].items())
                    if not prefix or name.startswith(prefix + "/")
                ]
                return self._send(200, entries)
            m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if m:
                repo = self._repo(m.group(1))
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository not found")
                data = repo["files"].get(m.group(3))
                headers = {"X-Repo-Commit": repo["sha"]}
                if data is None:
                    return self._send(404, {"error": "Entry not found"},
                                      {**headers, "X-Error-Code": "EntryNotFound"})
                etag = hashlib.sha256(data).hexdigest() if len(data) > 1000 else hashlib.sha1(data).hexdigest()
                return self._send(200, data, {**headers, "ETag": f'"{etag}"'},
                                  content_type="application/octet-stream")
            hub.unknown.append(f"{self.command} {path}")
            return self._error(404, "NotFound", f"unknown route {path}")

        do_HEAD = do_GET

    return Handler


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A fake Hub on 127.0.0.1:<random port>; huggingface_hub is pointed at it."""
    from huggingface_hub import constants

    hub = FakeHub()
    base_url = [""]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(hub, base_url))
    server.daemon_threads = True
    server.timeout = 5
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    base_url[0] = endpoint
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "5")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    # huggingface_hub reads these once at import: patch the module constants too.
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True, raising=False)
    import huggingface_hub.hf_api as hf_api_module

    monkeypatch.setattr(hf_api_module.api, "endpoint", endpoint)
    try:
        yield hub, endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _tiny_pruned_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hfprune.solvers.masks import nm_mask

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                module.weight[nm_mask(module.weight.abs(), 2, 4)] = 0
    model.config.pruning_config = {"method": "magnitude", "pattern": "2:4", "sparsity": 0.5,
                                   "calibration": None, "hfprune_version": "0.1.0"}
    return model


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_push_and_reload(fake_hub, tmp_path, fmt):
    import hfprune.formats  # noqa: F401  (registers the hfprune-sparse loader)
    from transformers import AutoModelForCausalLM

    from hfprune.hub import push_to_hub

    hub, endpoint = fake_hub
    model = _tiny_pruned_model()
    out = tmp_path / "out"
    if fmt == "dense":
        model.save_pretrained(out)
    else:
        hfprune.formats.save_sparse(model, out, max_shard_size="100KB")
    url = push_to_hub(out, "alice/tiny-pruned", private=True)
    assert url.startswith(endpoint) and url.endswith("alice/tiny-pruned")
    repo = hub.repos["alice/tiny-pruned"]
    assert repo["private"] is True
    assert "README.md" in repo["files"] and "config.json" in repo["files"]
    card = repo["files"]["README.md"].decode()
    assert card.startswith("---\n") and "hfprune" in card and "2:4" in card
    meta = hub.card_metadata[-1]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"pruned", "hfprune", "sparse", "magnitude", "2:4"} <= set(meta["tags"])
    if fmt == "sparse":
        assert "model.safetensors.index.json" in repo["files"]

    reloaded = AutoModelForCausalLM.from_pretrained("alice/tiny-pruned", cache_dir=str(tmp_path / "cache")).eval()
    x = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)
    assert reloaded.config.pruning_config["pattern"] == "2:4"
    assert not hub.unknown, hub.unknown


def test_existing_repo_and_exist_ok(fake_hub, tmp_path):
    from hfprune.hub import push_to_hub

    hub, _ = fake_hub
    out = tmp_path / "out"
    _tiny_pruned_model().save_pretrained(out)
    push_to_hub(out, "alice/again")
    with pytest.raises(ValueError, match="already exists.*exist_ok"):
        push_to_hub(out, "alice/again")
    (out / "README.md").write_text("second commit")
    (out / "extra.txt").write_text("not a model file")  # issue 28: only the checkpoint is uploaded
    push_to_hub(out, "alice/again", exist_ok=True, commit_message="second")
    assert hub.repos["alice/again"]["files"]["README.md"] == b"second commit"
    assert "extra.txt" not in hub.repos["alice/again"]["files"]


def test_missing_token(fake_hub, tmp_path, monkeypatch):
    from hfprune.hub import push_to_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    out = tmp_path / "out"
    _tiny_pruned_model().save_pretrained(out)
    with pytest.raises(ValueError, match="No Hugging Face token.*HF_TOKEN"):
        push_to_hub(out, "alice/no-token")
    with pytest.raises(ValueError, match="rejected the token"):
        push_to_hub(out, "alice/bad-token", token="hf_wrong")


def test_server_down(fake_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from hfprune.hub import push_to_hub

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    out = tmp_path / "out"
    _tiny_pruned_model().save_pretrained(out)
    with pytest.raises(RuntimeError, match="Could not reach the Hugging Face Hub"):
        push_to_hub(out, "alice/offline")


def test_bad_inputs(tmp_path):
    from hfprune.hub import push_to_hub

    with pytest.raises(FileNotFoundError):
        push_to_hub(tmp_path / "nope", "alice/x", token=TOKEN)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="Invalid repo id"):
        push_to_hub(tmp_path, "no-namespace", token=TOKEN)


def test_cli_parser():
    import argparse

    from hfprune.cli.push import _cmd_push, add_cli

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["push", "--model", "d", "--repo", "u/n", "--private", "--exist-ok", "--token", "t"])
    assert (args.model, args.repo, args.private, args.exist_ok, args.token) == ("d", "u/n", True, True, "t")
    assert args.func is _cmd_push


# --- issue 28: push uploads the checkpoint, not the folder ---------------------------------------------------

def _plant_secrets(out, tmp_path):
    """What a user keeps next to a checkpoint, and links that lead out of it."""
    (out / ".env").write_text("HF_TOKEN=hf_secret")
    (out / ".netrc").write_text("machine huggingface.co password hf_secret")
    (out / ".ssh").mkdir()
    (out / ".ssh" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    (out / "notes.txt").write_text("private notes")
    (out / "drafts").mkdir()
    (out / "drafts" / "card.md").write_text("draft")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"not for the hub")
    (out / "extra.safetensors").symlink_to(outside / "secret.safetensors")  # a model-file name, leading out
    (out / "linked").symlink_to(outside)


def _pushed(hub, repo):
    return set(hub.repos[repo]["files"])


def test_push_uploads_exactly_what_the_save_wrote(fake_hub, tmp_path, capsys):
    import hfprune
    from hfprune.cli import main

    hub, _ = fake_hub
    out = tmp_path / "out"
    hfprune.save_pretrained(_tiny_pruned_model(), out)
    manifest = json.loads((out / "hfprune_manifest.json").read_text())
    assert "README.md" in manifest["files"] and "config.json" in manifest["files"]
    _plant_secrets(out, tmp_path)
    before = {p.name for p in out.iterdir()}
    assert main(["push", "--model", str(out), "--repo", "alice/saved"]) == 0
    assert _pushed(hub, "alice/saved") == set(manifest["files"])
    assert {p.name for p in out.iterdir()} == before


def test_push_of_a_folder_hfprune_did_not_save_uploads_model_files_only(fake_hub, tmp_path, caplog):
    from hfprune.cli import main

    import logging

    caplog.set_level(logging.INFO, logger="hfprune.hub")
    hub, _ = fake_hub
    out = tmp_path / "out"
    _tiny_pruned_model().save_pretrained(out)                 # transformers' save: no hfprune manifest
    saved = {p.name for p in out.iterdir()}
    assert "config.json" in saved and "README.md" not in saved
    _plant_secrets(out, tmp_path)
    before = {p.name for p in out.iterdir()}
    assert main(["push", "--model", str(out), "--repo", "alice/plain"]) == 0
    assert _pushed(hub, "alice/plain") == saved | {"README.md"}   # the card is generated and uploaded ...
    assert {p.name for p in out.iterdir()} == before               # ... from memory: the folder is not written
    assert ".env (hidden file)" in caplog.text and "extra.safetensors (symbolic link leaving the folder)" in caplog.text


def test_push_dry_run_prints_the_list_and_uploads_nothing(fake_hub, tmp_path, capsys):
    from hfprune.cli import main

    hub, _ = fake_hub
    out = tmp_path / "out"
    _tiny_pruned_model().save_pretrained(out)
    saved = {p.name for p in out.iterdir()}
    _plant_secrets(out, tmp_path)
    before = {p.name for p in out.iterdir()}
    assert main(["push", "--model", str(out), "--repo", "alice/dry", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    upload, left_out = printed.split("Not uploaded:")
    assert {ln.strip() for ln in upload.splitlines()[1:]} == saved | {"README.md (generated model card)"}
    assert {ln.strip() for ln in left_out.splitlines()[1:-1]} == {
        ".env (hidden file)", ".netrc (hidden file)", ".ssh/ (hidden folder)", "notes.txt (not a model file)",
        "drafts/ (subfolder of a folder hfprune did not save)", "linked/ (symbolic link to a folder)",
        "extra.safetensors (symbolic link leaving the folder)"}
    assert "nothing was uploaded" in printed
    assert hub.repos == {} and {p.name for p in out.iterdir()} == before


@pytest.mark.parametrize("repo", ["../x", "alice/../x", "alice/x--y", "alice/.x", "alice/" + "x" * 97])
def test_push_refuses_invalid_repo_ids(fake_hub, tmp_path, caplog, repo):
    from hfprune.cli import main
    from hfprune.hub import push_to_hub

    hub, _ = fake_hub
    out = tmp_path / "out"
    _tiny_pruned_model().save_pretrained(out)
    with pytest.raises(ValueError, match="Invalid repo id"):
        push_to_hub(out, repo)
    assert main(["push", "--model", str(out), "--repo", repo]) == 2
    assert main(["push", "--model", str(out), "--repo", repo, "--dry-run"]) == 2
    assert "Invalid repo id" in caplog.text and hub.repos == {}


def test_push_ignores_unsafe_manifest_entries(fake_hub, tmp_path):
    """A hand-edited manifest cannot reach hidden files, files outside the folder, or links leading out of it."""
    import hfprune
    from hfprune.hub import push_to_hub

    hub, _ = fake_hub
    out = tmp_path / "out"
    hfprune.save_pretrained(_tiny_pruned_model(), out)
    manifest_path = out / "hfprune_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    saved = set(manifest["files"])
    (tmp_path / "outside.txt").write_text("secret")
    (out / ".env").write_text("HF_TOKEN=hf_secret")
    assert "model.safetensors" in saved
    (out / "model.safetensors").unlink()
    (out / "model.safetensors").symlink_to(tmp_path / "outside.txt")     # a listed name, now a link out
    manifest["files"] += [".env", "../outside.txt", "sub/../../outside.txt", "/etc/hostname"]
    manifest_path.write_text(json.dumps(manifest))
    push_to_hub(out, "alice/tampered")
    assert _pushed(hub, "alice/tampered") == saved - {"model.safetensors"}

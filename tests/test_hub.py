"""Model card and upload: the train script pushes to a local stand-in for the Hub (HF_ENDPOINT), token kept secret."""

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from test_data import write_caption_folder

from latentdiff.hub import card_for_repo, model_card, write_model_card

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_testTOKENthatMustNotLeak0123456789"


class FakeHub(BaseHTTPRequestHandler):
    """The four Hub endpoints an upload uses: create repo, validate the card's YAML, preupload, commit."""

    received: dict[str, bytes] = {}
    authorizations: list[str] = []

    def log_message(self, *args):  # keep the test output quiet
        pass

    def _reply(self, payload: dict, status: int = 200) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.authorizations.append(self.headers.get("Authorization", ""))
        endpoint = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
            return self._reply({"url": f"{endpoint}/{repo_id}", "name": repo_id})
        if self.path == "/api/validate-yaml":
            return self._reply({})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.received[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            return self._reply({"commitUrl": f"{endpoint}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        self._reply({"error": "not found"}, 404)

    def do_GET(self):  # nothing an upload needs (huggingface_hub may probe optional endpoints)
        self._reply({"error": "not found"}, 404)


@pytest.fixture
def fake_hub():
    FakeHub.received, FakeHub.authorizations = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeHub
    server.shutdown()


def test_model_card_metadata_and_body():
    card = model_card(
        "me/emoji-sd", "stable-diffusion-v1-5/stable-diffusion-v1-5", "org/emoji-captions",
        {"learning_rate": 1e-4, "resolution": 512, "hub_token": TOKEN, "seed": None, "lr_warmup_steps": 0,
         "use_ema": False, "noise_offset": 0.0},
        images=[("validation/step_10/0.png", "a red apple")], global_step=10,
    )  # fmt: skip
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "diffusers" and metadata["pipeline_tag"] == "text-to-image"
    assert metadata["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert metadata["datasets"] == ["org/emoji-captions"] and "latentdiff" in metadata["tags"]
    assert "| a red apple | ![](validation/step_10/0.png) |" in card
    assert "- learning_rate: 0.0001" in card and "- resolution: 512" in card and "seed" not in card
    assert TOKEN not in card  # only the listed hyperparameters are shown
    assert "- lr_warmup_steps: 0\n" in card and "- use_ema: False\n" in card and "- noise_offset: 0.0\n" in card
    assert "with latentdiff (Accelerate), 10 optimizer steps." in card
    local = model_card("out", "/models/base", "/data/images", {})
    assert "base_model" not in local.split("---")[1] and "datasets" not in local.split("---")[1]
    quoted = model_card("out", "/models/base", None, {}, images=[("v/0.png", 'a "quoted" cat')])
    code = quoted.split("```python")[1].split("```")[0]
    compile(code, "usage", "exec")  # the usage snippet stays valid Python whatever the prompt holds
    assert 'pipeline("a \\"quoted\\" cat")' in code


def run_train_script(endpoint: str, pipeline: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python train_scripts/train_text_to_image.py ... --push_to_hub --hub_token`, as a user runs it."""
    data = write_caption_folder(tmp_path / "data", n=4)
    command = [
        sys.executable, str(REPO_ROOT / "train_scripts" / "train_text_to_image.py"),
        "--pretrained_model_name_or_path", str(pipeline), "--train_data_dir", str(data),
        "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--resolution", "32",
        "--train_batch_size", "2", "--max_train_steps", "2", "--checkpointing_steps", "1", "--seed", "0",
        "--lr_warmup_steps", "0", "--validation_prompts", "a red square", "--validation_inference_steps", "2",
        "--push_to_hub", "--hub_token", TOKEN, *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_ENDPOINT": endpoint}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_relative_local_paths_are_no_card_metadata(tmp_path, monkeypatch):
    """`--pretrained_model_name_or_path models/base` reads like a Hub id; the Hub refuses a card naming it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    metadata = yaml.safe_load(model_card("out", "models/base", "images", {}).split("---")[1])
    assert "base_model" not in metadata and "datasets" not in metadata


def test_train_script_pushes_the_pipeline_but_no_checkpoint_or_token(fake_hub, tiny_pipeline_path, tmp_path):
    endpoint, hub = fake_hub
    output_dir = tmp_path / "out"
    result = run_train_script(
        endpoint, tiny_pipeline_path, tmp_path, "--report_to", "tensorboard", "--hub_model_id", "me/tiny-finetune"
    )

    uploaded = set(hub.received)
    for name in ("model_index.json", "README.md", "unet/diffusion_pytorch_model.safetensors", "unet/config.json",
                 "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "tokenizer/vocab.json", "scheduler/scheduler_config.json", "validation/step_2/0.png"):  # fmt: skip
        assert name in uploaded, name
    assert (output_dir / "checkpoint-2").is_dir()
    assert not [name for name in uploaded if "checkpoint" in name], uploaded
    assert hub.received["README.md"] == (output_dir / "README.md").read_bytes()
    assert (
        hub.received["unet/diffusion_pytorch_model.safetensors"]
        == (output_dir / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    )
    assert hub.authorizations and all(a == f"Bearer {TOKEN}" for a in hub.authorizations)  # the token was used...
    # ... and is nowhere else: not in the output, the logs, any file written, anything uploaded
    assert TOKEN not in result.stdout + result.stderr
    # what the user reads: log lines on lines of their own, not glued to the end of the progress bar's
    assert "Saved training state to" in result.stderr and "]INFO" not in result.stderr
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert not [name for name, content in hub.received.items() if TOKEN.encode() in content]


def test_lora_run_pushes_the_adapters_and_a_lora_card(fake_hub, tiny_pipeline_path, tmp_path):
    endpoint, hub = fake_hub
    run_train_script(endpoint, tiny_pipeline_path, tmp_path, "--lora_rank", "2", "--report_to", "none",
                     "--hub_model_id", "me/tiny-lora")  # fmt: skip
    output_dir = tmp_path / "out"
    assert {"pytorch_lora_weights.safetensors", "README.md", "training_config.json"} <= set(hub.received)
    assert not [name for name in hub.received if "checkpoint" in name or name.startswith(("unet/", "vae/"))]
    assert hub.received["pytorch_lora_weights.safetensors"] == (output_dir / "pytorch_lora_weights.safetensors").read_bytes()
    card = hub.received["README.md"].decode()
    assert "lora" in yaml.safe_load(card.split("---")[1])["tags"]
    assert f'from_pretrained("{tiny_pipeline_path}"' in card and 'pipeline.load_lora_weights("me/tiny-lora")' in card


@pytest.mark.parametrize("given, repo", [("me/emoji", "me/emoji"), ("emoji", "user/emoji")])
def test_push_renames_the_card_for_the_repo(fake_hub, tiny_pipeline_path, tmp_path, monkeypatch, given, repo):
    """`latentdiff push` of a run folder (the demo's is `model`): the card names the repo it lands in, with the
    namespace the Hub gave a bare name (the token's user)."""
    import huggingface_hub

    from latentdiff.cli import main

    endpoint, hub = fake_hub
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    folder = tmp_path / "model"
    shutil.copytree(tiny_pipeline_path, folder)
    write_model_card(folder, model_card("model", "org/base", None, {}, [("validation/0.png", "a cat")], 10))
    assert main(["push", str(folder), "--repo-id", given, "--token", TOKEN]) == 0
    card = hub.received["README.md"].decode()
    assert f"\n# {repo}\n" in card and f'StableDiffusionPipeline.from_pretrained("{repo}"' in card
    assert '"model"' not in card and "# model" not in card
    assert (folder / "README.md").read_text() == card


def test_push_without_a_reachable_hub_is_one_line(tiny_pipeline_path, monkeypatch, capsys):
    import huggingface_hub

    from latentdiff.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert main(["push", str(tiny_pipeline_path), "--repo-id", "me/tiny", "--token", "hf_not_a_real_token"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: Could not reach the Hub to create the repo me/tiny (") and "Traceback" not in error
    assert "hf_not_a_real_token" not in error
    assert main(["push", str(tiny_pipeline_path / "nothing-here"), "--repo-id", "me/tiny"]) == 2
    assert "nothing-here is not a folder: push the output folder of a training run" in capsys.readouterr().err


def test_a_lora_card_pushed_to_a_repo_loads_the_adapters_from_it():
    card = card_for_repo(model_card("model", "org/base", None, {}, lora=True), "me/repo")
    assert 'pipeline.load_lora_weights("me/repo")' in card and 'load_lora_weights("model")' not in card
    assert 'from_pretrained("org/base"' in card and card.count("# me/repo") == 1  # the base stays the base


def test_a_lora_card_keeps_a_base_named_as_the_output_folder():
    card = card_for_repo(model_card("emoji", "emoji", None, {}, lora=True), "me/emoji-lora")
    assert 'from_pretrained("emoji"' in card and 'load_lora_weights("me/emoji-lora")' in card


def test_a_prompt_with_line_breaks_stays_one_row_of_the_card_table():
    card = model_card("m", "org/base", None, {}, images=[("validation/step_8/0.png", "a folded\nprompt\n")])
    assert "| a folded prompt | ![](validation/step_8/0.png) |" in card.splitlines()


def test_upload_leaves_out_checkpoints_and_interrupted_writes_at_any_depth():
    """The patterns as huggingface_hub applies them (`filter_repo_objects`, fnmatch on the path in the folder)."""
    from huggingface_hub.utils import filter_repo_objects

    from latentdiff.hub import UPLOAD_IGNORE

    kept = ["README.md", "unet/diffusion_pytorch_model.safetensors", "validation/step_2/0.png", "notes.tmp-1.txt"]
    left_out = ["checkpoint-2/unet/diffusion_pytorch_model.safetensors", "checkpoint-2/training_state.json",
                ".tmp-entries-x/unet/config.json", ".old-unet-7/config.json", ".replaced-model-7/model_index.json",
                "validation/.tmp-step_8-abc/0.png"]  # fmt: skip
    assert list(filter_repo_objects(kept + left_out, ignore_patterns=UPLOAD_IGNORE)) == kept


CLI_WITH_HUB_WARNINGS = """
import logging, sys
from latentdiff import cli

def unreachable(argv, prog):
    logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    logging.getLogger("datasets.load").warning("a warning of datasets")
    raise FileNotFoundError("'org/name' is not a local folder, and the Hub could not be reached")

cli._train = unreachable
handlers = {name: list(logging.getLogger(name).handlers) for name in ("huggingface_hub", "datasets")}
code = cli.main(["train"])
assert {name: list(logging.getLogger(name).handlers) for name in handlers} == handlers  # put back
sys.exit(code)
"""


def test_the_cli_prints_each_hub_and_datasets_warning_once():
    """huggingface_hub and datasets print through their own handler and pass the record on to the root logger,
    whose handler the CLI sets up: offline, every retry warning came out twice before the one error line."""
    done = subprocess.run([sys.executable, "-c", CLI_WITH_HUB_WARNINGS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("Retrying in 1s [Retry 1/5].") == 1, done.stderr
    assert done.stderr.count("a warning of datasets") == 1, done.stderr
    assert "WARNING huggingface_hub.utils._http: Retrying in 1s" in done.stderr  # the CLI's format, above the bars
    assert done.stderr.strip().endswith("the Hub could not be reached")

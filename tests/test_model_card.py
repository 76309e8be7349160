"""The model card of an export states only what the export's own records hold, and its sample command works."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from mlaconvert.conversion.export import PLACEHOLDER

# A number standing alone: not part of a name (bf16, wan2.1, 3D), a version (0.1.0) or a hash.
NUMBER = re.compile(r"(?<![\w.\-])\d[\d,]*(?:\.\d+)?(?![\w.])")


def stated_numbers(card: str) -> list[str]:
    """Every number the card's prose and table state (front matter and the command block left out)."""
    body = card.split("---", 2)[2]
    prose = re.sub(r"```.*?```", "", body, flags=re.S)
    return NUMBER.findall(prose)


def recorded_numbers(folder: Path) -> list[float]:
    """The numbers the card may state: config.json's and rank_report.json's, and the cache sizes they imply."""
    config = json.loads((folder / "config.json").read_text())
    report = json.loads((folder / "rank_report.json").read_text())
    mla = config["mla"]
    latent = [dc + mla["rope_dim"] for dc in mla["dc"]]
    dense, layers = 2 * config["dim"], config["num_layers"]
    values = [config["dim"], config["num_heads"], config["dim"] // config["num_heads"], layers, *mla["dc"], mla["rope_dim"],
              mla["nope_dim"], mla["seed"], dense, sum(latent) / layers, dense * 2 * layers, 2 * sum(latent),
              100 * (1 - sum(latent) / layers / dense)]
    calibration = (report.get("conversion") or {}).get("calibration")
    if calibration:
        errors = [layer["mla"]["measured"]["attn_error"] for layer in report["layers"]]
        values += [calibration["tokens"], calibration["seed"], sum(errors) / len(errors), max(errors)]
    if "finetune" in report:
        info = report["finetune"]
        values += [info["steps"], info["after"]["agreement"]["clips"]]
        values += [info[when]["agreement"][key] for when in ("before", "after") for key in ("flow_relative_error_mean", "rollout_psnr_db_mean")]
    return values


def assert_card_tells_the_truth(folder: Path) -> str:
    card = (folder / "README.md").read_text()
    assert "None" not in card
    records = recorded_numbers(folder)
    for text in stated_numbers(card):
        value, decimals = float(text.replace(",", "")), len(text.partition(".")[2])
        assert any(abs(value - r) <= 0.5 * 10**-decimals + 1e-9 for r in records), f"the card states {text}, which no record holds"
    return card


def card_command(folder: Path) -> str:
    return re.search(r"```\n(mlaconvert sample .*)\n```", (folder / "README.md").read_text()).group(1)


def run_card_command(cli, folder: Path, tmp_path: Path) -> None:
    args = shlex.split(card_command(folder).replace(PLACEHOLDER, shlex.quote(str(folder))))
    args[args.index("-o") + 1] = str(tmp_path / "video")
    r = cli(*args[1:])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "video" / "latents.safetensors").is_file()


def test_analyze_leads_to_convert_whose_card_states_its_calibration(cli, tmp_path):
    r = cli("analyze", "builtin:tiny-wan", "--dc", "32", "-o", str(tmp_path / "analysis"))
    assert r.returncode == 0, r.stderr
    suggested = shlex.split(r.stdout.split("next: ")[1])
    assert suggested[:2] == ["mlaconvert", "convert"]
    r = cli(*suggested[1:], "--init", "asvd")  # asvd always calibrates
    export = Path(suggested[-1])
    assert r.returncode == 0, r.stderr
    assert f"next: mlaconvert finetune {export}" in r.stdout
    card = assert_card_tells_the_truth(export)
    assert "calibration pass ran" in card and "asvd" in card and "No calibration" not in card
    assert "--random-text --device cpu" in card  # tiny-wan reads no real umT5 prompts, and is small
    run_card_command(cli, export, tmp_path)


def test_a_fine_tuned_card_states_the_fine_tune_and_its_next_command_runs(cli, tmp_path):
    r = cli("convert", "builtin:tiny-wan", "--dc", "32", "--no-measure", "-o", str(tmp_path / "mla"))
    assert r.returncode == 0, r.stderr
    assert "No calibration pass was run" in (tmp_path / "mla" / "README.md").read_text()
    ft = tmp_path / "ft"
    r = cli("finetune", str(tmp_path / "mla"), "-o", str(ft), "--max-steps", "2", "--clips", "3", "--frames", "3",
            "--height", "32", "--width", "32", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    card = assert_card_tells_the_truth(ft)
    assert "Fine-tuned for 2 steps" in card and "before use" not in card and "revision" not in card
    suggested = r.stdout.split("next: ")[1].strip()
    assert suggested == card_command(ft).replace(PLACEHOLDER, str(ft)).replace("-o video", f"-o {ft}-sample")
    r = cli(*shlex.split(suggested)[1:])  # the card's command, run as finetune prints it
    assert r.returncode == 0, r.stderr

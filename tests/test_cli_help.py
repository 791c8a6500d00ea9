"""--help of every tool and of run_mindformer.py lists every flag with its default (or says it
is required), and keeps the description's own line breaks."""
import re
import subprocess
import sys

import pytest

from trainkit import ROOT, env

SCRIPTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tools").glob("*.py")) + ["run_mindformer.py"]


def flag_entries(help_text):
    """{flag: its whole help entry} from argparse's options section."""
    entries, current = {}, None
    for line in help_text.split("options:", 1)[1].splitlines():
        match = re.match(r"^  (-[-\w]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
    return entries


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag_with_its_default(script):
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    entries = flag_entries(result.stdout)
    entries.pop("-h")
    assert len(entries) >= 2
    for flag, entry in entries.items():
        assert "(default" in entry or "(required)" in entry, f"{script} {flag}: {entry}"


def test_defaults_shown_are_the_real_ones():
    result = subprocess.run([sys.executable, str(ROOT / "tools/llama_preprocess.py"), "--help"], cwd=ROOT,
                            env=dict(env(), COLUMNS="200"), capture_output=True, text=True, timeout=120)
    entries = flag_entries(result.stdout)
    assert entries["--seq_length"].endswith("(default: 2048)")
    assert entries["--template"].endswith("(default: vicuna_v1.1; hf with --vocab_file)")
    assert entries["--model_file"].endswith("this or --vocab_file is required)")

"""The user-facing documentation: the generated command-line reference, old flag spellings, --help, the README."""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(script: str):
    spec = importlib.util.spec_from_file_location("doc_" + script.replace("/", "_").removesuffix(".py"), ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_what_the_parsers_say():
    """docs/cli.md is written from the parsers; a flag added, renamed or re-defaulted without regenerating it fails here."""
    ref = load("docs/make_cli_reference.py")
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == ref.render(), "docs/cli.md is stale: run python docs/make_cli_reference.py"
    for script in ("main.py", "serve.py", "generate.py", "train_lora.py"):
        parser = ref.load_parser(script)
        for action in parser._actions:
            if action.option_strings and action.help != "==SUPPRESS==" and action.dest != "help":
                assert f"`{action.option_strings[0]}`" in committed, (script, action.option_strings)


@pytest.mark.parametrize("script, old, value, new_dest, expected", [
    ("train_lora.py", "--pool_config", ["pool.json"], "config_path", "pool.json"),
    ("train_lora.py", "--train_settings", ["train.yaml"], "settings", "train.yaml"),
    ("generate.py", "--no_adapter", [], "no_adapters", True),
    ("data/build_bigbench_suite.py", "--pool_config", ["x.json"], "config_path", "x.json"),
])
def test_old_flag_spellings_still_work_and_warn(script, old, value, new_dest, expected, caplog):
    module = load(script)
    parser = module.build_parser()
    with caplog.at_level(logging.WARNING, logger="flags"):
        parser.parse_known_args([old, *value])  # parse_with_settings parses a command line twice: still one warning
        args = parser.parse_args([old, *value])
    assert getattr(args, new_dest) == expected
    warnings = [r.getMessage() for r in caplog.records if r.name == "flags"]
    assert len(warnings) == 1 and old in warnings[0] and "deprecated" in warnings[0]
    # the new spelling alone: no warning, the same value
    caplog.clear()
    new_flag = "--" + new_dest
    args = module.build_parser().parse_args([new_flag, *value])
    assert getattr(args, new_dest) == expected and not [r for r in caplog.records if r.name == "flags"]
    assert not re.search(re.escape(old) + r"(?!\w)", parser.format_help())


def test_help_shows_defaults_and_keeps_example_line_breaks():
    text = load("main.py").build_parser().format_help()
    assert re.search(r"rows generated together \(default: 8\)", text)
    # the docstring's example keeps its continuation line
    assert "config/bigbench_pool.json \\\n        --res_path results/mixture.json" in text
    serve_help = load("serve.py").build_parser().format_help()
    assert "(default: 8000)" in serve_help and "(default: 127.0.0.1)" in serve_help


def test_readme_is_a_front_page_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 220
    assert "arxiv.org/abs/2402.09997" in readme
    assert "make demo" in readme and "make test" in readme
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_docs_pages_link_to_existing_files_and_name_no_checkout_path():
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        assert str(ROOT) not in text, f"{page.name} shows the checkout's absolute path"
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://", "mailto:")):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"

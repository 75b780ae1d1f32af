"""The documentation agrees with the code and stays inside the repository.

README's metric list is compared with what a running tier serves at ``/metrics``, in both
directions, so neither can change without the other. Every text file in the repository may
name documents only if they exist here: the project's documents are ``README.md`` and
``docs/``, and nothing points at files outside the repository.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import urllib.request
from pathlib import Path

import trio

from tests.helpers import CLIENT_KEY, LIVENESS_SECONDS, authed_client, start_chain

ROOT = Path(__file__).parent.parent


# --- README's metric list -----------------------------------------------------------------------


def readme_metrics() -> dict[str, set[str]]:
    """The metric families README's "Health and metrics" paragraph lists, with their labels
    beyond ``tier`` and ``market``: ``proxy_upstream_{frames,events}_total`` names two families, and a trailing
    ``{reason}`` names a label."""
    readme = (ROOT / "README.md").read_text()
    paragraph = re.search(r"^\*\*Health and metrics\.\*\*(.+?)\n\n", readme, flags=re.MULTILINE | re.DOTALL)
    assert paragraph, 'README has no "**Health and metrics.**" paragraph'
    listed: dict[str, set[str]] = {}
    for token in re.findall(r"`(proxy_[^`]+)`", paragraph.group(1)):
        labels = re.fullmatch(r"(.+?)\{([a-z_,]+)\}", token)
        if labels and "," not in labels.group(2):  # a trailing {label}, not a {a,b} expansion
            token, label_names = labels.group(1), set(labels.group(2).split(","))
        else:
            label_names = set()
        parts = re.split(r"\{([^}]*)\}", token)  # literal, choices, literal, choices, ...
        choices = [[part] if i % 2 == 0 else part.split(",") for i, part in enumerate(parts)]
        for combination in itertools.product(*choices):
            name = "".join(combination)
            assert name not in listed, f"README lists {name} twice"
            listed[name] = label_names
    return listed


def served_metrics(exposition: str) -> dict[str, set[str]]:
    """Family names from the ``# TYPE`` lines, with the labels of their samples beyond ``tier`` and ``market``."""
    families = dict.fromkeys(re.findall(r"^# TYPE (\S+) \S+$", exposition, flags=re.MULTILINE), None)
    served: dict[str, set[str]] = {name: set() for name in families}
    for line in exposition.splitlines():
        if not line or line.startswith("#"):
            continue
        sample, labels = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? \S+", line).groups()
        family = next(name for name in (sample, re.sub(r"_(bucket|count|sum)$", "", sample)) if name in served)
        label_names = set(re.findall(r'([a-z_]+)="', labels or ""))
        assert {"tier", "market"} <= label_names, f"README says every metric is labelled with tier and market: {line}"
        served[family] |= label_names - {"tier", "market", "le"}
    return served


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=LIVENESS_SECONDS) as response:
        return response.read().decode()


async def test_readme_lists_exactly_the_metrics_each_tier_serves(nursery):
    listed = readme_metrics()
    _, firehose, filtered = await start_chain(nursery, firehose=dict(metrics_port=0), filtered=dict(metrics_port=0))
    # a client on each tier, so that per-client and per-key families have samples to show their labels
    await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="T.AAPL")
    for tier in (firehose, filtered):
        served = served_metrics(await trio.to_thread.run_sync(_get, f"http://127.0.0.1:{tier.metrics_port}/metrics"))
        assert served, "no metric families served"
        assert sorted(set(served) - set(listed)) == [], f"served by {tier.config.tier}, missing from README"
        assert sorted(set(listed) - set(served)) == [], f"in README, not served by {tier.config.tier}"
        assert listed == served, "label names differ (README writes them as name{label})"


def test_readme_metric_list_parser_reads_expansions_and_labels():
    listed = readme_metrics()
    # the shorthand README uses must be read as the families it stands for
    assert {"proxy_upstream_frames_total", "proxy_upstream_events_total", "proxy_upstream_bytes_total"} <= set(listed)
    assert listed["proxy_events_dropped_total"] == {"reason"}
    assert listed["proxy_clients_connected"] == set()


# --- references stay inside the repository --------------------------------------------------

#: What points outside the repository: the documents the project started from, which are not
#: part of it. Written so that these patterns do not match their own source text.
OUTSIDE = {
    "a design document that is not in the repository": re.compile(r"\bdesign\.md\b", re.IGNORECASE),
    "a shared directory outside the repository": re.compile(r"\bshared[/\\](?:docs|seed)\b", re.IGNORECASE),
    "the original project's files": re.compile(r"MIGRATION_SUMMARY|\bPLAN\.md\b"),
    "the project this one started from (say what is meant)": re.compile(r"\bthe\s+seed\b(?!\s+(?:of|for|=))|\bseed['’]s\b",
                                                               re.IGNORECASE),
}
#: A document named by path: ``docs/protocol.md``, ``README.md``, ``../x.md``.
MARKDOWN_PATH = re.compile(r"(?<![\w/.:-])((?:\.\./|\./)*[\w.-]+(?:/[\w.-]+)*\.md)\b")
#: A relative Markdown link target: ``[text](architecture.md#the-tree)``.
MARKDOWN_LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s#]+)(?:#[^)\s]*)?\)")


def repository_text_files() -> list[Path]:
    """Files git tracks, and new ones it would track (not ignored), that are text."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode()
    files = []
    for name in filter(None, dict.fromkeys(listed.split("\0"))):
        path = ROOT / name
        if path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(path)
    assert any(path.name == "README.md" for path in files), "git ls-files found no README.md"
    return files


def dangling_references(path: Path, text: str) -> list[str]:
    problems = []
    for line_number, line in enumerate(text.splitlines(), 1):
        where = f"{path.relative_to(ROOT)}:{line_number}"
        for what, pattern in OUTSIDE.items():
            if pattern.search(line):
                problems.append(f"{where}: points at {what}: {line.strip()[:120]}")
        for match in MARKDOWN_PATH.finditer(line):
            start = line.rfind(" ", 0, match.start()) + 1
            if "://" in line[start:match.start()]:
                continue  # part of a URL: not a path in this repository
            target = match.group(1)
            if not any((base / target).exists() for base in (ROOT, ROOT / "docs", path.parent)):
                problems.append(f"{where}: names {target}, which is not in the repository")
        if path.suffix == ".md":
            for match in MARKDOWN_LINK.finditer(line):
                if not (path.parent / match.group(1)).exists():
                    problems.append(f"{where}: links to {match.group(1)}, which does not exist")
    return problems


def test_no_file_points_outside_the_repository_or_at_a_missing_document():
    problems = []
    for path in repository_text_files():
        if path == Path(__file__):
            continue  # this file holds the bad references its own test needs
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        problems += dangling_references(path, text)
    assert problems == [], "\n".join(problems)


def test_the_reference_check_catches_what_it_is_for(tmp_path):
    """The check above passes on a clean tree; here it must fail on each kind of bad reference."""
    source = ROOT / "proxy" / "example.py"  # a file in the repository, as far as paths go
    for bad in ("see design" ".md", "the table of shared" "/docs/protocol.md", "as in the " "seed's example",
                "docs/nowhere.md", "[the tree](docs/missing.md)"):
        assert dangling_references(source, bad), bad
    for fine in ("docs/protocol.md", "docs/architecture.md", "README.md", "SIMULATOR_SEED: same seed, same data",
                 "the seed of the random generator", "https://example.com/guide.md"):
        assert dangling_references(source, fine) == [], fine
    readme = ROOT / "README.md"
    assert dangling_references(readme, "[protocol](docs/protocol.md#channels)") == []
    assert dangling_references(readme, "[protocol](docs/nothing.md)")

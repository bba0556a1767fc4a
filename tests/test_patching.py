"""``hina-kohya patch``: the shipped diffs check, apply and revert cleanly, all or nothing, only
inside the target; the LyCORIS patch on the installed lycoris-lora gives the wrapper's groups."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hina_kohya.cli import main
from hina_kohya.patching import MARKER, PATCH_DIR, TARGETS, parse, run


def _synthetic_checkout(root: Path, kind: str) -> dict:
    """A folder with the files a patch targets: filler lines, with each hunk's old lines placed
    where the diff expects them (so no upstream file is needed), plus the marker files."""
    diff, required, _ = TARGETS[kind]
    for rel in required:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("# placeholder\n")
    contents = {}
    for fp in parse((PATCH_DIR / diff).read_text()):
        lines: list[str] = []
        for h in fp.hunks:
            while len(lines) < h.old_start - 1:
                lines.append(f"# filler {len(lines) + 1}")
            lines.extend(h.old)
        lines.extend(["# the end", ""])
        (root / fp.path).parent.mkdir(parents=True, exist_ok=True)
        (root / fp.path).write_text("\n".join(lines))
        contents[fp.path] = "\n".join(lines)
    return contents


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", list(TARGETS))
def test_check_apply_refuse_twice_revert(tmp_path, kind):
    original = _synthetic_checkout(tmp_path, kind)
    before = _snapshot(tmp_path)
    code, report = run(kind, str(tmp_path), "check")
    assert code == 0 and all(line.endswith("applies cleanly") for line in report[1:])
    assert report[0].startswith(TARGETS[kind][0] + ": Upstream version:")  # names the upstream version
    assert _snapshot(tmp_path) == before  # check changes nothing
    code, report = run(kind, str(tmp_path), "apply")
    assert code == 0
    for rel in original:
        text = (tmp_path / rel).read_text()
        assert MARKER in text and "hina_kohya.integration" in text
    patched = _snapshot(tmp_path)
    code, report = run(kind, str(tmp_path), "apply")
    assert code == 1 and "already patched" in report[-1] and _snapshot(tmp_path) == patched
    code, report = run(kind, str(tmp_path), "check")
    assert code == 0 and all("already applied" in line for line in report[1:])
    code, report = run(kind, str(tmp_path), "revert")
    assert code == 0 and _snapshot(tmp_path) == before  # byte for byte
    code, report = run(kind, str(tmp_path), "revert")
    assert code == 1 and "nothing to revert" in report[-1]


def test_bytes_outside_the_hunks_survive_apply_and_revert(tmp_path):
    """CRLF files stay CRLF, odd characters (form feed, U+2028) are kept; revert gives the bytes back."""
    original = _synthetic_checkout(tmp_path, "lycoris")
    rel = next(iter(original))
    crlf = ("# a form feed \x0c and a line separator \u2028 stay\n" + original[rel]).replace("\n", "\r\n")
    (tmp_path / rel).write_bytes(crlf.encode("utf-8"))
    before = (tmp_path / rel).read_bytes()
    assert run("lycoris", str(tmp_path), "apply")[0] == 0
    patched = (tmp_path / rel).read_bytes()
    assert b"\r\n" in patched and b"\n" not in patched.replace(b"\r\n", b"") and MARKER.encode() in patched
    assert run("lycoris", str(tmp_path), "revert")[0] == 0
    assert (tmp_path / rel).read_bytes() == before


def test_a_half_patched_checkout_can_be_finished_or_undone(tmp_path):
    original = _synthetic_checkout(tmp_path, "sd-scripts")
    before = _snapshot(tmp_path)
    assert run("sd-scripts", str(tmp_path), "apply")[0] == 0
    first = sorted(original)[0]
    (tmp_path / first).write_text(original[first])  # e.g. a git checkout of one file
    code, report = run("sd-scripts", str(tmp_path), "check")
    assert code == 0 and f"{first}: applies cleanly" in report and any("already applied" in r for r in report)
    code, report = run("sd-scripts", str(tmp_path), "apply")  # finishes the job
    assert code == 0 and report[1] == f"{first}: patched" and any("already patched, left as it is" in r for r in report)
    (tmp_path / first).write_text(original[first])
    code, report = run("sd-scripts", str(tmp_path), "revert")  # or undoes the rest
    assert code == 0 and _snapshot(tmp_path) == before


def test_a_missing_target_file_is_reported(tmp_path):
    original = _synthetic_checkout(tmp_path, "sd-scripts")
    gone = sorted(original)[-1]
    (tmp_path / gone).unlink()
    before = _snapshot(tmp_path)
    code, report = run("sd-scripts", str(tmp_path), "apply")
    assert code == 2 and gone in report[-1] and "missing" in report[-1] and _snapshot(tmp_path) == before
    assert run("sd-scripts", str(tmp_path), "check")[0] == 1


def test_files_that_moved_still_take_the_patch(tmp_path):
    original = _synthetic_checkout(tmp_path, "sd-scripts")
    for rel, text in original.items():
        (tmp_path / rel).write_text("\n".join(f"# new upstream line {i}" for i in range(37)) + "\n" + text)
    assert run("sd-scripts", str(tmp_path), "apply")[0] == 0


def test_a_hunk_that_no_longer_fits_changes_nothing(tmp_path):
    original = _synthetic_checkout(tmp_path, "sd-scripts")
    last = sorted(original)[-1]  # break only the second file: the first must stay untouched too
    target = tmp_path / last
    target.write_text(target.read_text().replace("return all_params, lr_descriptions", "return groups, descriptions"))
    before = _snapshot(tmp_path)
    code, report = run("sd-scripts", str(tmp_path), "check")
    assert code == 1 and any(line.startswith(f"{last}: does not apply") for line in report)
    assert "use the wrapper network modules" in "\n".join(report)
    code, report = run("sd-scripts", str(tmp_path), "apply")
    assert code == 1 and report[-1] == "Nothing changed." and _snapshot(tmp_path) == before


def test_refuses_folders_that_are_not_checkouts(tmp_path):
    (tmp_path / "library").mkdir()
    code, report = run("sd-scripts", str(tmp_path), "apply")
    assert code == 2 and "not an sd-scripts checkout" in report[0] and "train_network.py" in report[0]
    assert _snapshot(tmp_path) == {}
    code, report = run("lycoris", str(tmp_path), "check")
    assert code == 2 and "lycoris/kohya.py" in report[0]


def test_never_writes_through_a_symlink_out_of_the_target(tmp_path):
    root, outside = tmp_path / "checkout", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    original = _synthetic_checkout(root, "lycoris")
    rel = next(iter(original))
    real = outside / "kohya.py"
    real.write_text(original[rel])
    (root / rel).unlink()
    os.symlink(real, root / rel)
    code, report = run("lycoris", str(root), "apply")
    assert code == 2 and "outside" in report[-1]
    assert real.read_text() == original[rel]


def test_never_writes_through_a_symlinked_directory_out_of_the_target(tmp_path):
    root, outside = tmp_path / "checkout", tmp_path / "elsewhere"
    root.mkdir()
    original = _synthetic_checkout(root, "sd-scripts")
    shutil.move(str(root / "library"), str(outside))  # library/ now lives outside, linked back in
    os.symlink(outside, root / "library", target_is_directory=True)
    before_outside, before_root = _snapshot(outside), _snapshot(root)
    for mode in ("check", "apply"):
        code, report = run("sd-scripts", str(root), mode)
        assert code == 2 and "outside" in report[-1] and "library/train_util.py" in report[-1], report
    assert _snapshot(outside) == before_outside and _snapshot(root) == before_root
    assert any("library" in rel for rel in original)


def test_a_symlinked_directory_inside_the_target_is_patched_in_place(tmp_path):
    original = _synthetic_checkout(tmp_path, "sd-scripts")
    shutil.move(str(tmp_path / "library"), str(tmp_path / "vendored_library"))
    os.symlink(tmp_path / "vendored_library", tmp_path / "library", target_is_directory=True)
    code, report = run("sd-scripts", str(tmp_path), "apply")
    assert code == 0, report
    assert (tmp_path / "library").is_symlink()  # the link itself is left a link
    assert MARKER in (tmp_path / "vendored_library" / "train_util.py").read_text()
    code, report = run("sd-scripts", str(tmp_path), "revert")
    assert code == 0 and (tmp_path / "vendored_library" / "train_util.py").read_text() == original["library/train_util.py"]


@pytest.mark.parametrize("restore_fails", [False, True], ids=["rolled-back", "rollback-fails"])
def test_a_failed_write_rolls_back_the_files_already_written(tmp_path, monkeypatch, restore_fails):
    import hina_kohya.patching as patching

    _synthetic_checkout(tmp_path, "sd-scripts")
    before = _snapshot(tmp_path)
    real_write, calls = patching._write, []

    def failing_write(path, text):
        calls.append(path)
        if len(calls) == 2 or (restore_fails and len(calls) > 2):  # the second file: disk full
            raise OSError(28, "No space left on device")
        real_write(path, text)

    monkeypatch.setattr(patching, "_write", failing_write)
    code, report = run("sd-scripts", str(tmp_path), "apply")
    text = "\n".join(report)
    assert code == 2 and "could not write it ([Errno 28] No space left on device)" in text, report
    if restore_fails:  # the user is told which file is left patched, and how to undo it
        first = os.path.relpath(calls[0], os.path.realpath(tmp_path))
        assert report[-1].startswith(f"{first}: could not restore it") and f"git checkout -- {first}" in report[-1]
    else:
        assert report[-1] == "the files written before it were restored. Nothing changed."
        assert _snapshot(tmp_path) == before


def test_cli(tmp_path, capsys):
    _synthetic_checkout(tmp_path, "lycoris")
    assert main(["patch", "--lycoris", str(tmp_path)]) == 0
    assert "applies cleanly" in capsys.readouterr().out
    assert main(["patch", "--lycoris", str(tmp_path), "--apply"]) == 0
    assert main(["patch", "--lycoris", str(tmp_path), "--revert"]) == 0
    assert main(["patch"]) == 2 and main(["patch", "--lycoris", "a", "--sd-scripts", "b"]) == 2
    assert "exactly one of" in capsys.readouterr().err


BUILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from standins import LYCORIS_ALGOS, lycoris_network
    from lycoris import kohya
    assert "hina-kohya:" in open(kohya.__file__).read(), kohya.__file__
    net, _, _ = lycoris_network(LYCORIS_ALGOS["lokr_norm_dora"], module=kohya)
    groups, descs = net.prepare_optimizer_params(1e-5, 1e-4, 1e-4)
    print(json.dumps([[d, g.get("weight_decay"), g["lr"], g["param_names"]] for g, d in zip(groups, descs)]))
""")


def test_lycoris_patch_on_the_installed_package_gives_the_wrappers_groups(tmp_path):
    lycoris = pytest.importorskip("lycoris")
    from hina_kohya.networks import lycoris as wrapper
    from standins import LYCORIS_ALGOS, lycoris_network

    site = tmp_path / "site"
    shutil.copytree(Path(lycoris.__file__).parent, site / "lycoris")
    assert run("lycoris", str(site), "apply")[0] == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.getcwd()])}
    out = subprocess.run([sys.executable, "-c", BUILD, str(Path(__file__).parent)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    patched = json.loads(out.stdout.strip().splitlines()[-1])
    net, _, _ = lycoris_network(LYCORIS_ALGOS["lokr_norm_dora"], module=wrapper)
    groups, descs = net.prepare_optimizer_params(1e-5, 1e-4, 1e-4)
    ours = [[d, g.get("weight_decay"), g["lr"], g["param_names"]] for g, d in zip(groups, descs)]
    assert patched == ours and any(d.endswith("no_decay") for d, *_ in ours)

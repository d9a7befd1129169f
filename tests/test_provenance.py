"""Records name the code they ran on (dsv4_lab/runlog.py): `git.code_tree` is the tree hash of dsv4_lab/ as it is on
disk, equal to a commit's dsv4_lab tree exactly when the code is that commit's, edits and new files included (HEAD
alone cannot say that for a copied working tree with edits, as a device machine runs)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from dsv4_lab.runlog import code_tree, commits_with_code_tree, git_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def test_code_tree_names_the_code_on_disk(tmp_path):
    repo = tmp_path / "r"
    (repo / "dsv4_lab" / "sub").mkdir(parents=True)
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@t")
    _git(repo, "config", "user.name", "t")
    (repo / ".gitignore").write_text("__pycache__/\n")
    (repo / "dsv4_lab" / "a.py").write_text("x = 1\n")
    (repo / "dsv4_lab" / "sub" / "b.py").write_text("y = 2\n")
    (repo / "notes.md").write_text("outside the package\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "one")
    first = _git(repo, "rev-parse", "HEAD")
    tree1 = _git(repo, "rev-parse", "HEAD:dsv4_lab")
    assert code_tree(repo) == tree1                                 # clean: the commit's tree
    (repo / "dsv4_lab" / "__pycache__").mkdir()
    (repo / "dsv4_lab" / "__pycache__" / "a.pyc").write_bytes(b"\0")
    (repo / "notes.md").write_text("edited, outside the package\n")
    assert code_tree(repo) == tree1                                 # ignored files and other paths do not count
    (repo / "dsv4_lab" / "a.py").write_text("x = 3\n")
    edited = code_tree(repo)
    assert edited not in (None, tree1)                              # an edit counts, uncommitted
    assert git_commit(repo) == {"commit": first, "dirty": True, "code_tree": edited}
    (repo / "dsv4_lab" / "new.py").write_text("z = 4\n")
    untracked = code_tree(repo)
    assert untracked not in (None, tree1, edited)                   # so does an untracked file
    assert git_commit(repo)["commit"] == first                      # where HEAD still names the old commit
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "two")
    assert code_tree(repo) == untracked == _git(repo, "rev-parse", "HEAD:dsv4_lab")
    assert commits_with_code_tree(untracked, repo) == [_git(repo, "rev-parse", "HEAD")]
    assert commits_with_code_tree(tree1, repo) == [first]
    assert _git(repo, "status", "--porcelain") == ""                # the repository's own index is untouched


def test_code_tree_without_a_repository_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))   # no repository above tmp_path either
    (tmp_path / "dsv4_lab").mkdir()
    assert code_tree(tmp_path) is None
    assert commits_with_code_tree("0" * 40, tmp_path) == []

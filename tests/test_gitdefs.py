"""``from: git`` test definitions in lavacore-run: git repositories made by the test in
tmp_path, the runner on its own (real processes, a PULL socket standing for the master's
log socket), then a real master and worker."""

import os
import pathlib
import subprocess
import sys

import pytest
import yaml

from lavacore.states import JobHealth, JobState
from test_runner import Run

pytestmark = pytest.mark.timeout(60)

GIT_ENV = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org",
               GIT_CONFIG_NOSYSTEM="1")
DEFINITION = {
    "metadata": {"format": "Lava-Test Test Definition 1.0", "name": "smoke-git",
                 "description": "a definition from git"},
    "params": {"GREETING": "hello", "WHO": "nobody"},
    "run": {"steps": [
        "./smoke/check.sh",
        "echo \"version=$(cat VERSION) who=$WHO greeting=$GREETING\"",
        "echo \"depth=$(git rev-list --count HEAD 2>/dev/null || echo none)\"",
        "echo \"origin=$(git remote get-url origin 2>/dev/null || echo none)\"",
    ]},
}


def git(cwd, *args):
    done = subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def commit(repo, message, files):
    for name, text in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if name.endswith(".sh"):
            path.chmod(0o755)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


class RepoPath(pathlib.PosixPath):
    """A repository's path, with ``shas``: its commits, oldest first."""


@pytest.fixture
def repo(tmp_path):
    """main: c0 (definition), c1 (VERSION 1), c2 (VERSION 2); stable: c1 + VERSION stable."""
    path = RepoPath(tmp_path / "tests-repo")
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    shas = [commit(path, "c0", {
        "smoke/smoke.yaml": yaml.safe_dump(DEFINITION, sort_keys=False),
        "smoke/check.sh": "#!/bin/sh\nlava-test-case script-ran --result pass\n",
        "VERSION": "0\n"})]
    shas.append(commit(path, "c1", {"VERSION": "1\n"}))
    git(path, "checkout", "-q", "-b", "stable")
    commit(path, "stable", {"VERSION": "stable\n"})
    git(path, "checkout", "-q", "main")
    shas.append(commit(path, "c2", {"VERSION": "2\n"}))
    path.shas = shas
    return path


def git_job(url, *definitions, **fields):
    """A job with one git definition per mapping in ``definitions`` (or one plain one)."""
    items = []
    for number, extra in enumerate(definitions or ({},)):
        item = {"from": "git", "repository": str(url), "path": "smoke/smoke.yaml",
                "name": "smoke" if number == 0 else "smoke%d" % number}
        item.update(fields)
        item.update(extra)
        items.append(item)
    return yaml.safe_dump({
        "device_type": "host", "job_name": "git job", "priority": "medium",
        "visibility": "public", "timeouts": {"job": {"seconds": 50}},
        "actions": [{"test": {"definitions": items}}]}, sort_keys=False)


def targets_of(run, prefix):
    return [t for t in run.messages("target") if t.startswith(prefix)]


def test_a_git_definition_runs_in_its_clone_with_its_parameters(tmp_path, repo):
    run = Run(tmp_path, git_job(repo, parameters={"WHO": "the job"}))
    assert run.finish() == 0, run.stderr
    assert run.job_result()["result"] == "pass"
    assert run.cases()["script-ran"]["result"] == "pass"
    assert targets_of(run, "version=") == ["version=2 who=the job greeting=hello"]
    assert targets_of(run, "depth=") == ["depth=1"]  # shallow by default
    assert targets_of(run, "origin=") == ["origin=%s" % repo]
    lava = run.cases("lava")["0_smoke"]
    assert lava["result"] == "pass"
    assert (lava["repository"], lava["path"], lava["revision"], lava["commit_id"]) == (
        str(repo), "smoke/smoke.yaml", "unspecified", repo.shas[2])
    info = run.messages("info")
    assert any(m.startswith("0_smoke: fetching smoke/smoke.yaml from %s" % repo) for m in info)
    assert any(m.startswith("0_smoke: commit %s, 4 step(s)" % repo.shas[2]) for m in info)


def test_revision_branch_shallow_and_history(tmp_path, repo):
    run = Run(tmp_path, git_job("file://%s" % repo, {"revision": repo.shas[1]},
                                {"branch": "stable"}, {"shallow": False},
                                {"history": False}))
    assert run.finish() == 0, run.stderr
    assert targets_of(run, "version=") == [
        "version=%s who=nobody greeting=hello" % v for v in ("1", "stable", "2", "2")]
    assert targets_of(run, "depth=") == ["depth=2", "depth=1", "depth=3", "depth=none"]
    lava = run.cases("lava")
    assert lava["0_smoke"]["revision"] == repo.shas[1]
    assert lava["0_smoke"]["commit_id"] == repo.shas[1]
    assert lava["1_smoke1"]["revision"] == "stable"


@pytest.mark.parametrize("case", ["no repository", "no branch", "no revision", "no path",
                                  "outside", "not yaml", "no cache", "unreachable"])
def test_what_cannot_be_fetched_fails_the_job_before_anything_runs(tmp_path, repo, case,
                                                                    monkeypatch):
    url, extra = str(repo), {}
    if case in ("no repository", "no cache"):
        url = str(tmp_path / "missing-repo")
        if case == "no cache":
            monkeypatch.setenv("LAVACORE_GIT_CACHE", "off")
    elif case == "unreachable":
        url = "git://127.0.0.1:1/tests.git"  # nothing listens on port 1
    elif case == "no branch":
        extra = {"branch": "nope"}
    elif case == "no revision":
        extra = {"revision": "0123456789abcdef0123456789abcdef01234567"}
    elif case == "no path":
        extra = {"path": "smoke/missing.yaml"}
    elif case == "outside":
        os.symlink("/etc/hostname", repo / "escape.yaml")
        commit(repo, "escape", {})
        extra = {"path": "escape.yaml"}
    else:
        commit(repo, "broken", {"broken.yaml": "run: {steps: [\n"})
        extra = {"path": "broken.yaml"}
    # The definition runs after an inline one: nothing may run before the fetch.
    text = git_job(url, extra)
    data = yaml.safe_load(text)
    data["actions"].insert(0, {"test": {"definitions": [{
        "from": "inline", "name": "first", "path": "inline/first.yaml",
        "repository": {"metadata": {"format": "Lava-Test Test Definition 1.0",
                                    "name": "first"},
                       "run": {"steps": ["echo first-ran"]}}}]}})
    run = Run(tmp_path, yaml.safe_dump(data, sort_keys=False))
    assert run.finish() == 1
    result = run.job_result()
    expected = {
        # A repository that is not there is the job's mistake; a host that cannot be
        # reached, the lab's (LAVA: Infrastructure for both).
        "no repository": ("Job", "1_smoke: cannot fetch the git repository %s:"
                          " fatal: repository '%s' does not exist" % (url, url)),
        "no cache": ("Job", "1_smoke: cannot clone the git repository %s:"
                     " fatal: repository '%s' does not exist" % (url, url)),
        "unreachable": ("Infrastructure", "1_smoke: cannot fetch the git repository %s:"
                        " fatal: unable to connect to 127.0.0.1" % url),
        "no branch": ("Job", "1_smoke: %s has no branch 'nope'" % url),
        "no revision": ("Job", "1_smoke: %s: cannot check out revision '0123456789abcdef"
                        % url),
        "no path": ("Job", "1_smoke: cannot open the test definition smoke/missing.yaml:"
                    " No such file or directory"),
        "outside": ("Job", "1_smoke: escape.yaml leads outside the repository"),
        "not yaml": ("Job", "1_smoke: actions[1].test.definitions[0] (broken.yaml in %s):"
                     " not valid YAML: line 2" % url),
    }[case]
    assert (result["error_type"], result["error_msg"][:len(expected[1])]) == expected, result
    assert "first-ran" not in run.messages("target")


def test_the_workers_cache_clones_once_and_fetches_what_changed(tmp_path, repo, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LAVACORE_GIT_CACHE", str(cache))

    def job(name, text):
        (tmp_path / name).mkdir()
        run = Run(tmp_path / name, text)
        assert run.finish() == 0, run.stderr
        return run

    first = job("first", git_job(repo))
    assert any("not in the worker's cache yet, cloning it" in m
               for m in first.messages("info"))
    assert len([p for p in os.listdir(cache) if p.endswith(".git")]) == 1
    newer = commit(repo, "c3", {"VERSION": "3\n"})
    second = job("second", git_job(repo))
    assert not any("cloning it" in m for m in second.messages("info"))
    assert targets_of(second, "version=") == ["version=3 who=nobody greeting=hello"]
    # A commit the cache holds needs no fetch: the repository may even be gone.
    os.rename(repo, tmp_path / "moved")
    third = job("third", git_job(repo, revision=newer))
    assert any("commit %s is in the worker's cache, no fetch" % newer in m
               for m in third.messages("info"))
    assert targets_of(third, "version=") == ["version=3 who=nobody greeting=hello"]


def test_jobs_starting_together_share_one_cold_cache(tmp_path, repo, monkeypatch):
    monkeypatch.setenv("LAVACORE_GIT_CACHE", str(tmp_path / "cache"))
    runs = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        runs.append(Run(tmp_path / name, git_job(repo), job_id=str(20 + len(runs))))
    for run in runs:
        assert run.finish() == 0, run.stderr
        assert targets_of(run, "version=") == ["version=2 who=nobody greeting=hello"]
    clones = [m for run in runs for m in run.messages("info") if "cloning it" in m]
    assert len(clones) == 1


def test_install_git_repos_are_cloned_next_to_the_definition(tmp_path, repo):
    helper = tmp_path / "helper.git"
    helper.mkdir()
    git(helper, "init", "-q", "-b", "main")
    commit(helper, "h", {"README": "helper\n"})
    git(helper, "checkout", "-q", "-b", "other")
    commit(helper, "o", {"README": "other\n"})
    git(helper, "checkout", "-q", "main")
    definition = dict(DEFINITION, install={"git-repos": [
        str(helper), {"url": "HELPER_URL", "destination": "second", "branch": "other"}],
        "steps": ["echo install-steps-in $(basename $(pwd))"]})
    definition["params"] = dict(DEFINITION["params"], HELPER_URL=str(helper))
    definition["run"] = {"steps": [
        "echo \"readme=$(cat helper/README) $(cat second/README)\""]}
    commit(repo, "with git-repos", {"smoke/smoke.yaml": yaml.safe_dump(definition)})
    run = Run(tmp_path, git_job(repo))
    assert run.finish() == 0, run.stderr
    assert targets_of(run, "readme=") == ["readme=helper other"]
    assert "install-steps-in 0_smoke" in run.messages("target")


# -- through a real master and worker ------------------------------------------------------

def test_git_jobs_through_a_worker(lab, tmp_path, repo):
    lab = lab(devices=(("host01", "host", "worker1", ()),))
    work = tmp_path / "work"
    log = open(tmp_path / "worker1.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lavacore.worker.cli", "--master",
         lab.master.controller.endpoint, "--logs", lab.master.logs.endpoint,
         "--hostname", "worker1", "--work-dir", str(work),
         "--runner", "%s -m lavacore.worker.runner" % sys.executable,
         "--hello-retry", "0.2", "--job-check", "0.2", "--poll-timeout", "0.1"],
        stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    try:
        good = lab.submit(git_job(repo))
        bad = lab.submit(git_job(tmp_path / "nowhere"))
        lab.wait_for(lambda: all(lab.job(i).state == JobState.FINISHED for i in (good, bad)),
                     timeout=40, what="both jobs")
        job = lab.job(good)
        assert job.health == JobHealth.COMPLETE, job.failure_comment
        cases = {(c.suite, c.name): c for c in lab.storage.list_testcases(good)}
        assert cases[("0_smoke", "script-ran")].result == "pass"
        assert yaml.safe_load(cases[("lava", "0_smoke")].metadata)["commit_id"] == repo.shas[2]
        job = lab.job(bad)
        assert job.health == JobHealth.INCOMPLETE
        assert job.failure_comment.startswith(
            "Job: 0_smoke: cannot fetch the git repository %s: fatal: repository"
            % (tmp_path / "nowhere"))
        assert not job.infrastructure_error
        # The worker keeps the repository in its work dir, not in a job's directory.
        assert [p for p in os.listdir(work / "git-cache") if p.endswith(".git")]
        lab.wait_for(lambda: os.listdir(work / "tmp") == [], timeout=20,
                     what="the job directories removed")
    finally:
        proc.terminate()
        proc.wait(10)

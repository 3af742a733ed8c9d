"""lavacore db migrate / check / copy from the command line, onto the real PostgreSQL."""

import json

import pytest

import pgutil
from conftest import job_yaml, run_cli, write_config
from lavacore import config as config_mod
from lavacore.master import Master

pytestmark = pytest.mark.timeout(120)


def test_db_migrate_check_and_copy_to_postgres(tmp_path):
    config_path = write_config(tmp_path)
    Master(config_mod.load(config_path)).start().stop()  # creates the devices
    (tmp_path / "job.yaml").write_text(job_yaml())
    ids = [int(run_cli(config_path, "submit", str(tmp_path / "job.yaml")).stdout)
           for _ in range(3)]
    assert run_cli(config_path, "jobs", "cancel", str(ids[0])).returncode == 0
    done = run_cli(config_path, "db", "migrate")
    assert done.returncode == 0 and "up to date" in done.stdout
    done = run_cli(config_path, "db", "check")
    assert done.returncode == 0, done.stderr
    schema = pgutil.new_schema()
    try:
        done = run_cli(config_path, "db", "copy", "--to", pgutil.PG_URL, "--schema", schema)
        assert done.returncode == 0, done.stderr
        assert "jobs" in done.stdout
        target = pgutil.storage(schema)
        try:
            copied = {j.id: (j.state.display, j.health.display) for j in target.list_jobs()}
            assert copied == {ids[0]: ("Finished", "Canceled"), ids[1]: ("Submitted", "Unknown"),
                              ids[2]: ("Submitted", "Unknown")}
            assert [d.hostname for d in target.list_devices()] == ["qemu01"]
        finally:
            target.close()
        # A second copy into the same, now non-empty, schema is refused in one line.
        again = run_cli(config_path, "db", "copy", "--to", pgutil.PG_URL, "--schema", schema)
        assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1
        # The lab then runs on PostgreSQL with the same jobs.
        (tmp_path / "pg").mkdir()
        pg_config = write_config(tmp_path / "pg", storage=pgutil.storage_lines(schema))
        done = run_cli(pg_config, "jobs", "show", str(ids[1]), "--json")
        assert done.returncode == 0, done.stderr
        shown = json.loads(done.stdout)
        assert shown["state"] == "Submitted"
    finally:
        pgutil.drop_schema(schema)

"""The down-node check's reading of `sinfo` and its verdicts, on sinfo's own output format
(the two-node Slurm tests run it against a real cluster with a node taken down)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from retro_toolkit.errors import UserError
from retro_toolkit.runner.slurm_nodes import check_partition, parse_sinfo

# `sinfo -h -N -o '%N|%T|%E|%P'` on a cluster whose rtnode1 is in two partitions.
SINFO = """\
rtnode1|idle|none|multi
rtnode1|idle|none|debug*
rtnode2|down*|PSU failure|multi
rtnode3|idle*|none|multi
rtnode4|drained|disk full|multi
"""


def executor(nodes: int, partition: str | None = "multi"):
    return OmegaConf.create({"nodes": nodes, "partition": partition})


def test_each_node_is_read_once_with_its_state_and_reason():
    got = parse_sinfo(SINFO)
    assert [(n.name, n.state, n.reason) for n in got] == [
        ("rtnode1", "idle", ""), ("rtnode2", "down*", "PSU failure"), ("rtnode3", "idle*", ""),
        ("rtnode4", "drained", "disk full")]
    assert [(n.usable, n.responding) for n in got] == [(True, True), (False, False), (True, False), (False, True)]
    assert [n.name for n in parse_sinfo(SINFO, default_only=True)] == ["rtnode1"]


def test_a_job_that_fits_the_answering_nodes_passes_in_silence(capsys):
    check_partition(parse_sinfo(SINFO), executor(1), "pretrain")
    assert capsys.readouterr().err == ""


def test_a_job_that_needs_a_node_not_answering_is_let_through_with_a_warning(capsys):
    check_partition(parse_sinfo(SINFO), executor(2), "pretrain")
    assert capsys.readouterr().err == ("warning: stage pretrain: Slurm's controller has not heard from rtnode3 lately "
                                       "(sinfo shows it '*'): the job waits until it answers.\n")


def test_a_job_larger_than_the_nodes_that_take_jobs_is_refused_naming_each_other_node():
    with pytest.raises(UserError) as e:
        check_partition(parse_sinfo(SINFO), executor(3), "build_db")
    assert str(e.value).startswith(
        "stage build_db asks for executor.nodes=3 in partition 'multi', which has 2 node(s) that take jobs: "
        "rtnode2 is down* (PSU failure); rtnode4 is drained (disk full). The job would wait until a node returns.")
    assert "executor.stages.build_db.partition" in str(e.value)


def test_an_empty_partition_is_refused():
    with pytest.raises(UserError, match=r"stage eval_ppl: the default partition has no nodes \(sinfo lists none\)"):
        check_partition([], executor(1, partition=None), "eval_ppl")

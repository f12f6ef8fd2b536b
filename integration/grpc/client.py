#!/usr/bin/env python3
"""A client that is not ours: Python grpcio with stubs generated from proto/ by
grpcio-tools, driving a running update-agent over its Unix socket.

  client.py --socket PATH --url PAYLOAD_URL

Lists the services by reflection, asks the standard health service, reads status,
runs a full update with streamed progress to ARMED, cancels the armed release, reads
history, and checks that an unknown version is NOT_FOUND. Prints what it sees; exits
non-zero (with the reason) on the first surprise.
"""
import argparse
import json
import pathlib
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_tools import protoc

REPO = pathlib.Path(__file__).resolve().parents[2]


def generate_stubs(out: pathlib.Path):
    """Runs protoc (from grpcio-tools) on our .proto, as any client team would."""
    import grpc_tools

    wkt = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main([
        "protoc",
        f"-I{REPO / 'proto'}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "updateagent/v1/agent.proto",
    ])
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, str(out))
    from updateagent.v1 import agent_pb2, agent_pb2_grpc  # noqa: E402

    return agent_pb2, agent_pb2_grpc


def expect(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--url", required=True, help="payload URL to stage")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        pb, rpc = generate_stubs(pathlib.Path(tmp))
        # gRPC C-core sends the socket path as :authority, which is not a valid HTTP/2
        # authority and the agent's HTTP/2 stack resets such streams: name a host.
        channel = grpc.insecure_channel(
            f"unix://{args.socket}", options=[("grpc.default_authority", "localhost")])

        # Reflection: what a stock tool (grpcurl, Postman) would see.
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = sorted(s.name for r in replies for s in r.list_services_response.service)
        print("services:", ", ".join(services))
        expect("updateagent.v1.UpdateAgent" in services, "reflection lists updateagent.v1.UpdateAgent")
        expect("grpc.health.v1.Health" in services, "reflection lists grpc.health.v1.Health")

        health = health_pb2_grpc.HealthStub(channel)
        h = health.Check(health_pb2.HealthCheckRequest(service="updateagent.v1.UpdateAgent"))
        expect(h.status == health_pb2.HealthCheckResponse.SERVING, "health: SERVING")

        agent = rpc.UpdateAgentStub(channel)
        st = agent.GetStatus(pb.GetStatusRequest())
        print(f"status: state={st.state} running={st.running_version} booted={st.booted.name} "
              f"other={st.other.name} bootloader={st.bootloader.backend}")
        expect(st.state in ("idle", "cancelled"), "nothing pending before the update")

        try:
            agent.StartUpdate(pb.StartUpdateRequest(version="9.9"))
            expect(False, "unknown version refused")
        except grpc.RpcError as e:
            expect(e.code() == grpc.StatusCode.NOT_FOUND, f"unknown version is NOT_FOUND ({e.details()})")

        op = agent.StartUpdate(pb.StartUpdateRequest(url=args.url, reboot=pb.REBOOT_POLICY_NEVER))
        print("operation:", op.operation_id)
        phases, progress, result = [], [], None
        for ev in agent.WatchUpdate(pb.WatchUpdateRequest(operation_id=op.operation_id)):
            kind = ev.WhichOneof("kind")
            if kind == "snapshot":
                print(f"snapshot: {ev.snapshot.version or '?'} phase={pb.Phase.Name(ev.snapshot.phase)}")
            elif kind == "phase":
                phases.append(pb.Phase.Name(ev.phase))
                print("phase:", phases[-1])
            elif kind == "progress":
                p = ev.progress
                progress.append(p.bytes_done)
                print(f"progress: {p.bytes_done}/{p.bytes_total} bytes, {p.bytes_fetched} fetched, "
                      f"op {p.ops_done}/{p.ops_total}")
            elif kind == "result":
                result = ev.result
                print(f"result: {pb.Outcome.Name(result.outcome)} {result.version} {result.reason}")
        expect(result is not None and result.outcome == pb.OUTCOME_ARMED, "update ends ARMED")
        expect(progress and progress == sorted(progress), "progress streamed, never backwards")
        expect("PHASE_VERIFYING" in phases and "PHASE_ARMED" in phases, "phases verifying and armed seen")

        st = agent.GetStatus(pb.GetStatusRequest())
        expect(st.other.state == pb.SLOT_STATE_ARMED and st.other.version == result.version,
               f"status shows {result.version} armed on slot {st.other.name}")

        c = agent.Cancel(pb.CancelRequest())
        expect(c.slot == st.other.name, f"cancel drops the armed release in slot {c.slot}")
        st = agent.GetStatus(pb.GetStatusRequest())
        expect(st.state == "cancelled" and not st.other.bootable, "slot no longer bootable after cancel")

        hist = agent.ListHistory(pb.ListHistoryRequest(page_size=10))
        entries = [{"version": e.version, "outcome": pb.Outcome.Name(e.outcome), "slot": e.slot}
                   for e in hist.entries]
        print("history:", json.dumps(entries))
        expect(entries and entries[0]["outcome"] == "OUTCOME_CANCELLED", "history records the cancel")
    print("python grpcio client: all checks passed")


if __name__ == "__main__":
    main()

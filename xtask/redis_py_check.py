"""Reads a pytest JUnit report of redis-py's own tests and compares it with
the committed list of tests expected to fail on Cachet (and why).

    redis_py_check.py REPORT.xml EXPECTED.txt           compare; exit 1 on a difference
    redis_py_check.py REPORT.xml EXPECTED.txt --write   rewrite EXPECTED.txt from REPORT.xml
    redis_py_check.py REPORT.xml --summary              counts only (another server's run)

A test listed as expected to fail that passes is a difference too: the list
must say what fails today, no more.
"""
import re
import sys
import xml.etree.ElementTree as ET

# What each unknown command belongs to, for the reasons written by --write.
TYPES = [
    (r"^(Z|GEO|BZ)", "sorted sets (and geo, built on them) are not a Cachet data type"),
    (r"^(L|R|BL|BR)(PUSH|POP|RANGE|LEN|INDEX|INSERT|SET|REM|TRIM|POS|MOVE|MPOP|PUSHX)", "lists are not a Cachet data type"),
    (r"^S(ADD|MEMBERS|CARD|ISMEMBER|MISMEMBER|POP|RANDMEMBER|REM|MOVE|INTER|UNION|DIFF|SCAN|INTERCARD)", "sets are not a Cachet data type"),
    (r"^H", "hashes are not a Cachet data type"),
    (r"^X", "streams are not a Cachet data type"),
    (r"^PF", "HyperLogLog is not a Cachet data type"),
    (r"^(BITOP|BITFIELD)", "BITOP and BITFIELD are not implemented"),
    (r"^ACL$", "ACL commands: Cachet's users come from a file (--resp-acl)"),
    (r"^(DUMP|RESTORE)$", "DUMP/RESTORE: Redis's RDB encoding"),
    (r"^(MONITOR|LATENCY|MEMORY|SLOWLOG|MODULE|ROLE|REPLICAOF|SLAVEOF|BGSAVE|SAVE|LASTSAVE|BGREWRITEAOF|LOLWUT|RESET|SHUTDOWN|DEBUG|SWAPDB|MOVE|PSYNC|SYNC|FAILOVER|WAIT|WAITAOF)$",
     "server administration Cachet does not have (persistence, replication, introspection)"),
    (r"^(TRACKING|TRACKINGINFO|GETREDIR|CACHING)$", "client-side caching (CLIENT TRACKING) is not implemented yet"),
    (r"^(PAUSE|UNPAUSE|UNBLOCK|NO-EVICT|NO-TOUCH|REPLY|KILL|LIST|INFO|GETKEYSANDFLAGS)$", "this CLIENT/COMMAND subcommand is not implemented"),
    (r"^OBJECT$", "OBJECT is not implemented"),
    (r"^(EVAL|EVALSHA|SCRIPT|FUNCTION|FCALL|FCALL_RO)", "scripting is not supported"),
    (r"^(PUBLISH|SUBSCRIBE|PSUBSCRIBE|PUBSUB|SPUBLISH|SSUBSCRIBE)", "pub/sub is not supported"),
    (r"^(SORT|SORT_RO)$", "SORT works on lists, sets and sorted sets"),
]


def results(path):
    """Each test's outcome and failure message, by test id."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        classname = case.get("classname", "")
        parts = classname.split(".")
        module = "/".join(parts[:-1]) + ".py" if len(parts) > 1 else classname
        test = f"{module}::{parts[-1]}::{case.get('name')}" if parts[-1][:1].isupper() else f"{module}::{case.get('name')}"
        failed = case.find("failure")
        if failed is None:
            failed = case.find("error")
        if failed is not None:
            out[test] = ("failed", (failed.get("message") or "").replace("\n", " "))
        elif case.find("skipped") is not None:
            out[test] = ("skipped", "")
        else:
            out[test] = ("passed", "")
    return out


def reason(message):
    command = re.search(r"unknown (?:sub)?command '([^']+)'", message)
    if command:
        name = command.group(1).upper()
        for pattern, why in TYPES:
            if re.search(pattern, name):
                return f"{why} ({name})"
        return f"{name} is not implemented"
    return "FIXME: " + message[:120]


def expected(path):
    listed = {}
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        if not line or line.startswith("#"):
            continue
        test, _, why = line.partition("  ")
        listed[test.strip()] = why.strip()
    return listed


def counts(found):
    tally = {"passed": 0, "failed": 0, "skipped": 0}
    for outcome, _ in found.values():
        tally[outcome] += 1
    return tally


def main():
    report = sys.argv[1]
    found = results(report)
    tally = counts(found)
    print(f"redis-py suite: {len(found)} tests, {tally['passed']} passed, {tally['failed']} failed, {tally['skipped']} skipped")
    if sys.argv[2:] == ["--summary"]:
        return 0
    listing = sys.argv[2]
    if sys.argv[3:] == ["--write"]:
        lines = [
            "# redis-py 6.4.0's own tests (tests/test_commands.py, test_pipeline.py, test_connection.py",
            "# from its PyPI sdist) that fail against a Cachet node, each with why. `cargo xtask redis-py`",
            "# fails when a test fails that is not listed, or a listed one passes. Two spaces part a",
            "# test from its reason.",
        ]
        for test, (outcome, message) in sorted(found.items()):
            if outcome == "failed":
                old = expected(listing).get(test) if __import__("os").path.exists(listing) else None
                lines.append(f"{test}  {old or reason(message)}")
        open(listing, "w", encoding="utf-8").write("\n".join(lines) + "\n")
        print(f"wrote {listing}")
        return 0
    listed = expected(listing)
    unexpected = [(t, m) for t, (o, m) in sorted(found.items()) if o == "failed" and t not in listed]
    passing = [t for t, (o, _) in sorted(found.items()) if o == "passed" and t in listed]
    missing = [t for t in sorted(listed) if t not in found]
    for test, message in unexpected:
        print(f"UNEXPECTED FAILURE {test}: {message[:300]}")
    for test in passing:
        print(f"NOW PASSES (remove it from {listing}) {test}")
    for test in missing:
        print(f"NOT RUN (listed in {listing}) {test}")
    print(f"expected failures: {len(listed)} listed; {len(unexpected)} unexpected failures, {len(passing)} listed tests passing, {len(missing)} listed tests not run")
    return 1 if unexpected or passing or missing else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Runs one Paho interoperability suite (client_test.py or client_test5.py) against a broker.

The suites read host, port and topic names from globals their `__main__` block sets; this runner
imports the module, sets them, runs its unittest cases and prints one line per test plus a summary
line `SUMMARY <label> run=N passed=P failed=F` that conformance/run.sh collects.
"""
import argparse
import importlib
import io
import os
import signal
import sys
import unittest


class TestTimeout(Exception):
    pass


def on_alarm(signum, frame):
    raise TestTimeout("test did not finish in time")


class TimedResult(unittest.TextTestResult):
    """Some tests wait forever for a packet a broker never sends (test_flow_control2 against a
    broker whose Receive Maximum is 65535); an alarm turns that into an error for that test."""

    seconds = 60

    def startTest(self, test):
        signal.alarm(self.seconds)
        super().startTest(test)

    def stopTest(self, test):
        signal.alarm(0)
        super().stopTest(test)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite-dir", required=True, help="paho.mqtt.testing/interoperability")
    ap.add_argument("--version", choices=["3", "5"], required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--log", required=True, help="file for the suite's own output")
    ap.add_argument("--test-timeout", type=int, default=60, help="seconds per test")
    ap.add_argument("tests", nargs="*", help="test names (default: all)")
    args = ap.parse_args()

    sys.path.insert(0, args.suite_dir)
    mod = importlib.import_module("client_test" if args.version == "3" else "client_test5")
    # What each suite's __main__ block would set (client_test5's setUpClass resets the topics).
    mod.host, mod.port = args.host, args.port
    mod.topics = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
    mod.wildtopics = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")
    mod.nosubscribe_topics = ("test/nosubscribe",)
    mod.topic_prefix = "client_test5/"  # used by client_test5.test_shared_subscriptions

    loader = unittest.TestLoader()
    if args.tests:
        suite = unittest.TestSuite(mod.Test(t) for t in args.tests)
    else:
        suite = loader.loadTestsFromTestCase(mod.Test)

    names = sorted(t.id().split(".")[-1] for t in suite)  # the runner empties the suite
    with open(args.log, "w") as log:
        # The suites print tracebacks and progress to stdout/stderr; keep them in the log.
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = log
        try:
            TimedResult.seconds = args.test_timeout
            signal.signal(signal.SIGALRM, on_alarm)
            runner = unittest.TextTestRunner(stream=log, verbosity=2, resultclass=TimedResult)
            result = runner.run(suite)
        finally:
            sys.stdout, sys.stderr = saved

    failed = sorted({t.id().split(".")[-1] for t, _ in result.failures + result.errors})
    run = result.testsRun
    for t in names:
        print(f"  {'FAIL' if t in failed else 'ok  '} {t}")
    print(f"SUMMARY {args.label} run={run} passed={run - len(failed)} failed={len(failed)}"
          + (f" ({' '.join(failed)})" if failed else ""))
    sys.stdout.flush()
    # The suites leave client threads behind; do not wait for them.
    os._exit(0 if not failed else 1)


if __name__ == "__main__":
    main()

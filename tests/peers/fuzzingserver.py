# Python 2.7: Autobahn|Testsuite's fuzzing server as the sandbox, reachable through the gateway.
# wstest 0.8 refuses a Host whose port differs from its own listening port; through the gateway the
# Host carries the gateway's port, so that check is switched off (externalPort = None).
import sys

from autobahntestsuite import fuzzing, wstest

_init = fuzzing.FuzzingServerFactory.__init__


def _init_any_port(self, spec, debug=False):
    _init(self, spec, debug)
    self.externalPort = None


fuzzing.FuzzingServerFactory.__init__ = _init_any_port
sys.argv = ["wstest", "-m", "fuzzingserver", "-s", sys.argv[1], "--webport", "0"]
wstest.run()

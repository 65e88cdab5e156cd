"""The evaluation runner behind sim_eval.py, one module per job:

- policies.py: what a policy is, loading one, batching many sessions into one call
- openpi.py: policies served by openpi's WebsocketPolicyServer (its wire format, its LIBERO inputs)
- runner.py: episodes over parallel sessions and servers, with failover
- preflight.py: the policy checked before the first episode (its inputs, its action, one step)
- stats.py: the 95% intervals (Wilson's for success rates, Student's t for mean returns)
- records.py: one record per episode, the results file and its resume, LeRobot's eval_info.json
- report.py: success rates (or mean returns) with intervals, the text table, the chart, the HTML report
- videos.py: one video per episode, and thumbnails for the report
- compare.py: two runs compared pair by pair (paired interval, McNemar's exact test)
- actions.py: each episode's executed actions and digests, kept beside the results file
- replay.py: episodes re-run from their actions with no policy: replay, verify, fork
- ray_fleet.py: simulator servers as Ray actors (--ray)

Everything here needs only sim_client.py beside it (websockets and Pillow for openpi://, Ray for --ray).
"""


class SetupError(Exception):
    """The run cannot start (a bad policy, an unknown task, no server): said in one line, exit 2."""


class PolicyError(Exception):
    """The policy failed on one observation; that episode fails ("policy_error") and the run goes on."""

    failure = "policy_error"


class PolicyTimeout(PolicyError):
    """No action came within the policy timeout; that episode fails ("policy_timeout")."""

    failure = "policy_timeout"

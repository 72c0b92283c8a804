"""The load plan and its rules, shared by the Locust users and the harness: pure, imports nothing of ours.

`plan` (the one load-plan model: lengths, the arrival process, the levels, the search, stopping, objectives),
`arrivals` (closed-loop users and open-loop request rates, a registry keyed by kind), `search` (which level to try
next), `slo` (objectives, verdicts, goodput), `records` (the per-request and per-level records a load writes) and
`timing` (per-request metrics from event timestamps).
"""

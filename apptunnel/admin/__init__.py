"""The one code path of every admin change: validate, store, audit, nudge the proxy.

The CLI's admin verbs (cli/) and the admin API and pages (web/admin_api.py) both call
these services, so a change made in a browser and one made with ``apptunnel`` are
checked by the same rules and leave the same audit event (``via`` says which door).
Who may call them is decided before (the caller's role rules, auth/rbac.py); the
services themselves only act.
"""

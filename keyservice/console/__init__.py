"""The web console at ``/console/``: server-rendered pages for keys and audit review.

It owns only the translation of browser requests (forms, links) into service calls: every key
action is ``KeyService.call`` with the logged-in principal in the request context, exactly as a
wire request, so key policies, identity policies and grants apply and every action is audited
(``user_agent`` names the console). Login sessions, CSRF tokens, the login rate limit and the
security headers are this package's own; audit pages read the log through ``keyservice.audit``'s
review functions, all called from ``audit_views``. It imports no store or operation module.
"""

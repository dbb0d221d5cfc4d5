-- wrk script for the upload scenario: every request POSTs the same {{BODY_BYTES}}-byte body
-- (wrk adds Content-Length itself).
wrk.method = "POST"
wrk.body = string.rep("x", {{BODY_BYTES}})
wrk.headers["Content-Type"] = "application/octet-stream"

-- wrk script: POST a small JSON body (a capturable request).
wrk.method = "POST"
wrk.body = '{"name":"John","email":"john@example.com","note":"captured by the benchmark"}'
wrk.headers["Content-Type"] = "application/json"

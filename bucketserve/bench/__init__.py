"""``bucketserve bench``: measure any OpenAI-compatible server (ours or another) the same way.

``datasets`` builds text requests, ``client`` streams one request and times it, ``runner``
replays a workload with an arrival process, ``report`` summarises, ``sweep`` varies the request
rate, ``servers`` starts and stops ``bucketserve serve`` processes, ``compare`` runs one
workload against several servers, ``cli`` wires it to the command line.
"""

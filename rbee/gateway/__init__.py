"""`rbee serve`: the OpenAI HTTP API in front of every hive in reach.

Editors, agents and chat front ends speak the OpenAI API; the gateway turns each of their requests
into what `rbee infer` does (choose a hive, get a worker, stream the job) and the job's frames back
into OpenAI's JSON and server-sent events. Modules, each one noun:

* ``params``  an OpenAI request body → a ``Call`` (GenerateParams and how to answer); pure
* ``shapes``  responses, stream chunks and error bodies in OpenAI's shape; pure
* ``errors``  rbee error codes → HTTP status, OpenAI error type and Retry-After; pure
* ``auth``    loopback rule, the API-key file and env, the constant-time Bearer check
* ``jobs``    one request's keeper work on a thread of its own, bridged to the event loop
* ``listing`` the models of every hive in reach, for ``GET /v1/models``
* ``app``     the Starlette routes; ``main`` binds, serves and stops
"""

"""Ray Serve hosting: ModelServer replicas that sample and self-judge (server.py), a VLM judge's JudgeServer app
beside them (judge.py), and what both need (replica.py: Serve on loopback, quiet logs). Nothing is imported
here: Ray Data's workers import replica.py alone, without the model stack server.py brings."""

"""The shared core: what serve and align both need and where they meet.

Settings (`settings`), every Redis key (`keys`), the typed records serve writes and align reads
(`records`), the versions registry and store (`versions`), the Redis connection / private
redis-server (`redis_server`) and the root CLI (`cli`). serve and align import this package and
never each other.
"""

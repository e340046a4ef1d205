"""Discord: the webhook posts of new ghosts and friends.

- `dynamo.discord.webhook`: the messages (`ghost_content`, `friend_content`), the payload
  and the call (`post_webhook`).
"""

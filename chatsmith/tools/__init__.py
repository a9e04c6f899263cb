"""Tools (OpenAI function calling): tool definitions and calls checked and parsed
(`chatsmith.tools.calls`), the built-in calculator (`chatsmith.tools.calculator`), and the hook
that runs a built-in tool inside generation (`chatsmith.tools.inline`)."""

"""Node events: one stream reader per replica fanned out in memory, /ws/events, and the thaw of a pause that raced with work."""

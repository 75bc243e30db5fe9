"""The tuner's parts: the ladder of candidate recipes per backend (`ladder`), the stop rule that accepts and confirms
a candidate (`rule`), and the choice among those that keep the budget (`choice`). `int8eval tune`
(int8eval.commands.tune) composes them with the session stages."""

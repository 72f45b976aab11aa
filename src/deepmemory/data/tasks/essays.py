"""Natural text for the haystacks and the BABILong noise: short essays written for this package
(plain ASCII prose; no digits, no personal names, nothing that reads as a needle or as a bAbI
story sentence). ``ESSAYS`` is a tuple of paragraphs; ``sentences()`` splits them."""

from __future__ import annotations

import re

TEXT = """
A river is never the same water twice, yet people give it one name and speak of it as if it
stayed still. It begins in high ground as a thin thread of melt and rain, gathers strength from a
hundred small streams, and slows as the land flattens toward the sea. Along the way it carries
sand, leaves, seeds and the patient weight of silt. Where the current loses speed, that silt
settles and builds the broad, soft plains that farmers have always loved. Floods that ruin a
season also renew the soil for the next one. Old towns grew at the places where a river could be
crossed on foot in summer or where boats had to stop and unload. Many of those crossings became
markets, and many markets became cities. Even now, the shape of a street often follows a bank
that has long since moved.

Bread is one of the oldest agreements between people and grain. Flour and water alone make a
dull paste, but a little yeast and time change everything. The yeast feeds on sugars in the
dough and breathes out gas, and the stretchy web of gluten traps that gas in countless small
pockets. Kneading aligns the web and makes it strong. Resting lets it relax so that the loaf can
rise without tearing. In the oven the pockets swell one last time before the crumb sets and the
crust browns. Bakers speak of feel more than of rules, because flour changes from harvest to
harvest and a humid morning is not a dry one. A good loaf sounds hollow when it is tapped
underneath. The smell of it cooling on a rack has ended more arguments than any speech.

Lighthouses were built for the hours when the coast is most dangerous and least visible. A tower
on a headland lifts the lamp above the curve of the sea, so that the light can be seen from far
away. Each light has its own pattern of flashes, and sailors learn to read them like signatures.
A long beam followed by darkness means one harbor, while a cluster of short flashes means
another. Keepers once trimmed wicks, wound clockwork and polished the great lenses every day.
The lens itself is a marvel of rings of glass, each one bending stray light into a single
forward beam. Today most towers run by themselves, but the old rule remains the same. A light is
worth nothing if it fails on the one night that matters.

Honeybees live as a single household of many thousands. Most of them are workers, and their
tasks change as they age. The youngest clean the cells and feed the growing brood. Older workers
build comb from wax that they make in their own bodies, guard the entrance, and finally fly out
to gather nectar and pollen. A forager that finds a rich patch of flowers returns and dances on
the comb. The direction of the dance points toward the flowers relative to the sun, and its
length tells the distance. In winter the colony clusters into a warm ball and shivers to make
heat, slowly eating the honey stored through summer. A hive that has gathered too little will not
see the spring. The sweetness on the table is the record of a long season of work.

A mechanical clock is a controlled fall. A weight or a spring wants to release its energy all at
once, and the escapement allows it to escape only a little at a time. With each swing of the
pendulum a small toothed wheel is let forward by one step and then caught again. The steady tick
is the sound of that catching. Early town clocks had a single hand and were not very accurate,
but they gave a whole community the same hour. Later makers learned to correct for heat, which
lengthens a pendulum and slows it, by combining metals that expand by different amounts. Sailors
needed even better clocks to find their position at sea. Patient craftsmen spent their lives on
that problem, and the answer changed navigation forever.

A map is a careful lie that tells the truth about one thing at a time. The earth is round and
paper is flat, so every map stretches some places and squeezes others. A chart made for sailors
keeps angles true, so that a straight line is a steady compass course, but it swells the lands
near the poles. Other maps keep areas true and bend the shapes instead. Beyond the projection,
the mapmaker must choose what to leave out. A road map has no use for the depth of lakes, and a
walking map cares little for motorways. Contour lines turn hills into rings, each ring a fixed
height above the sea. Reading them well is a skill that grows with use. A good map is not the
land, but it can keep a traveller from getting lost in it.

Winter arrives in the countryside as a change of sound before it is a change of sight. Leaves
stop rustling because there are no leaves left. Birds that sang all summer fall quiet or leave
for warmer places. The first hard frost stiffens the grass so that it crunches underfoot. Ponds
freeze at the edges and then across the middle, and the ice sings and cracks as it thickens. In
the villages, smoke rises straight from the chimneys on still mornings. Animals grow thicker
coats, and some of them sleep through the coldest weeks. The days are short, and the light that
does come is low and golden. Then, long after it seems that the cold will never end, water begins
to drip from the eaves again.

Rain begins high above the ground as tiny droplets too light to fall. They form around specks of
dust or salt and drift inside the cloud. As they bump together, some grow heavy enough to drop,
and on the way down they gather more water. In colder clouds, ice crystals grow at the expense of
the droplets around them and melt into rain as they fall through warmer air. The size of a
raindrop is limited, because large drops flatten and break apart. What reaches the ground soaks
into the soil, runs off into streams, or rises again as vapor. The smell after a summer shower
comes partly from oils released by plants and partly from the soil itself. Farmers watch the sky
with an attention that city dwellers rarely need.

A library is a promise that questions can outlive the people who first asked them. Its shelves
hold arguments that were settled long ago and others that are still open. The order of the books
matters as much as the books themselves. A volume placed on the wrong shelf is nearly as lost as
one that was never bought. Catalogs were once written by hand on small cards and kept in long
wooden drawers. Readers learned to follow a subject from one card to the next, discovering titles
they had not known to look for. Quiet is the rule in the reading rooms, not because words are
unwelcome but because so many are already speaking at once. A good librarian can find almost
anything, including the book that a visitor did not know was needed.

The first railways ran on wooden rails and were pulled by horses. Iron rails and steam engines
changed that within a lifetime. Lines were surveyed across valleys and through hills, and whole
armies of workers dug cuttings, raised embankments and bored long tunnels. Railways needed a
common time so that trains could meet and pass safely, and towns that had kept their own local
hour gave it up. Station buildings became some of the grandest rooms in the land. Goods that had
taken weeks to arrive now came in days. Fresh fish reached inland markets, and newspapers were
read far from the presses that printed them. The rhythm of wheels over rail joints became the
sound of distance made small.

Salt was once valuable enough to pay soldiers and to cause wars. It preserves food by drawing
water out of it, so that the small creatures that cause decay cannot thrive. Before cold storage,
salted fish and meat carried whole nations through the winter. Salt was gathered by letting the
sea evaporate in shallow pans under the sun, or by mining ancient beds left behind by seas that
dried up long ago. Roads were built to carry it, and taxes on it filled the purses of kings. In
the kitchen, a pinch brings out flavors that would otherwise stay hidden. Too much spoils a dish
that nothing else can rescue. The oldest cooks knew that the right amount is learned only by
tasting.

Glass is made from sand, which is among the most common things in the world, and yet it seems
almost miraculous when it flows from a furnace. The sand is heated with ash or soda until it melts
into a glowing syrup. A glassblower gathers a lump on the end of a hollow pipe, blows into it,
and turns it steadily so that gravity does not pull it out of shape. The piece must be cooled
slowly in a warm oven, or stresses trapped inside will crack it later. Windows were once a
luxury, made of small panes joined with lead. Later a way was found to float molten glass on a
bath of liquid metal, producing sheets as flat as still water. We look through glass so often
that we forget it is there at all.

A bridge is a quarrel with gravity that must be won every single day. The simplest bridge is a
log across a stream, which bends under load and may snap if the load is too great. An arch turns
the weight into a push that runs along its curve and down into the banks, which is why stone
arches built long ago still carry traffic. Suspension bridges hang their decks from cables that
sweep between tall towers and are anchored deep in the ground at each end. Engineers must think
about wind as well as weight, because a deck that sways in rhythm with gusts can tear itself
apart. Expansion joints let the structure lengthen in summer heat. From a distance, the finished
bridge looks light and simple, hiding the careful calculations that keep it standing.

Paper began as a way to write on something cheaper than skins and lighter than clay. Fibers from
bark, rags or wood are beaten in water until they separate, and the pulp is lifted on a fine
screen. As the water drains away, the fibers tangle into a thin mat. Pressed and dried, the mat
becomes a sheet. Early papermakers worked one sheet at a time, and a skilled pair could make
many hundreds in a day. Machines later produced paper in continuous rolls of great length. Good
paper lasts for centuries, while cheap paper made with acid turns yellow and brittle within a
few decades. Archivists now spend much of their effort slowing that decay. A letter written by
hand still carries something that a screen does not.

The tides follow the moon more faithfully than any servant. As the earth turns, the pull of the
moon raises a gentle bulge of water on the near side and another on the far side. Coasts pass
through these bulges and see the water rise and fall, usually twice in a little more than a day.
When the sun and moon line up, the tides are strongest, and when they pull at right angles, the
tides are weak. The shape of the coast matters as well. In narrow bays the water can climb
higher than a house, while on some open shores it barely moves. Fishermen plan their days around
the tide tables, and walkers on wide sands learn to watch the water closely. The sea returns
whether anyone is ready or not.

An old forest is quieter than a young one, and darker too. The tallest trees form a roof that
catches most of the light, and the floor beneath is covered in moss, ferns and fallen branches.
Dead wood is not wasted there. Fungi and beetles break it down slowly, returning its substance to
the soil that feeds the next generation of trees. Some fungi link the roots of many trees in a
web beneath the ground, trading sugars for minerals. Woodpeckers drum on trunks to find insects,
and owls nest in hollows left by broken limbs. A storm that topples a giant opens a gap of
sunlight where seedlings race upward. Over a very long time, the forest is always changing while
seeming to stand still.

Wind is air moving from places of high pressure toward places of low pressure. The sun warms the
ground unevenly, and warm air rises while cooler air flows in to take its place. Near the coast,
a breeze blows inland during the day and out to sea at night, because land warms and cools faster
than water. On a larger scale, the turning of the earth bends the great winds into belts that
circle the globe. Sailors learned those belts by heart and used them to cross oceans. Windmills
once ground grain and pumped water from low fields. Their sails had to be turned to face the wind
and reefed when it blew too hard. The modern turbines on the hills do the same work with longer
blades and quieter voices.

Mountains are made slowly and worn down slowly, and both processes are happening at once. Where
great plates of rock press against each other, the crust crumples and rises over ages. Rain,
frost and ice attack the heights as soon as they appear. Water seeps into cracks, freezes, expands
and splits the stone apart. Glaciers grind broad valleys with steep walls and leave piles of
rubble where they melt. Rivers carry the fragments away and spread them across the lowlands. The
air grows thinner and colder with height, and trees give way to low shrubs and then to bare rock
and snow. Climbers say that the mountain decides who reaches the top. Weather changes quickly up
there, and a clear morning can become a dangerous afternoon.

A market is a place where a town talks to itself. Farmers arrive before dawn with carts of
vegetables, eggs and cheese. Stalls go up in rows, and the first customers are usually those who
know exactly what they want. Later the crowd grows slower and more curious, tasting samples and
comparing prices. Traders call out their goods, and regular buyers are greeted like old friends.
News travels quickly between the stalls, faster than any printed sheet. By midday, the best fruit
is gone and the prices begin to fall. Bargain hunters wait for this moment. When the stalls come
down in the afternoon, the square returns to its ordinary quiet, with only a few crushed leaves
to show what happened there.

A candle is a small and patient machine. The heat of the flame melts the wax near the wick, and
the liquid climbs the wick by the same pull that draws water into a paper towel. Near the flame
the wax turns to vapor, and it is the vapor that actually burns. The bright yellow part of the
flame glows because tiny specks of soot are heated until they shine. A draft makes the flame
flicker and the wax drip down one side. Trimming the wick keeps the flame steady and the smoke
low. For most of history, candles and oil lamps were the only light after sunset, and they were
expensive enough that people went to bed early. Reading late into the night was a luxury of the
wealthy.

Wool is shorn from sheep once a year, usually in early summer when the animals no longer need
their heavy coats. The fleece comes off in one piece if the shearer is skilled. It is washed to
remove grease and dirt, then combed or carded so that the fibers lie in the same direction.
Spinning twists the fibers together into yarn, and the twist is what gives the yarn its
strength. A spinning wheel made the work faster than a hand spindle, and later machines made it
faster still. Wool keeps its warmth even when it is damp, which made it the choice of sailors and
shepherds. Dyes came from roots, bark, berries and insects. Each region once had its own colors
and patterns, recognized at a glance.

Bells are among the loudest instruments people have ever made. They are cast from bronze poured
into a mold of clay and loam, and the shape of the inside decides the note. A bell that is too
thick is trimmed on a lathe until it sings true. A large bell can take many months to prepare and
only minutes to cast. In towns, bells marked the hours, called people to gather, warned of fire
and celebrated weddings. Ringers in some towers learned long sequences in which the bells change
order according to strict patterns, never repeating a row. The sound can carry across miles of
open country on a still evening. When a bell cracks, its voice is lost, and it must be melted
and cast again.

Ink has been made from soot, from plants and from the galls that form on oak trees. Soot ink is
simply fine carbon mixed with a binder such as gum, and it stays black for centuries. Gall ink
starts pale and darkens as it dries, but over time it can eat into the paper beneath it. Scribes
cut their pens from the feathers of large birds and sharpened them often. A steady hand and an
even flow of ink were the marks of a trained writer. Printing needed a thicker ink that would
cling to metal type, so printers mixed their pigments with oil. Today most ink is made in
factories, yet artists still grind their own colors for the pleasure of controlling every
shade.

A harbor is a gap in the coast where the sea becomes gentle enough to trust. Some harbors are
natural bays sheltered by headlands, while others were made by building long walls of stone out
into the water. Inside the walls, boats rise and fall with the tide but are spared the full force
of the waves. Quays are lined with bollards, ropes, nets and stacks of crates. Gulls patrol the
edges, waiting for scraps from the fishing boats. On stormy nights the whole town listens to the
wind and thinks of the crews still at sea. A harbor master keeps order, assigning berths and
watching the weather. When the boats are home and tied up safely, the harbor feels like a room
with its doors closed.

An orchard is a bet placed on the future. Fruit trees take years to bear well, and the person who
plants them may not live to see their best harvests. Most are grafted, with a cutting of a chosen
variety joined onto a hardy rootstock. The rootstock decides how large the tree will grow, and
the graft decides what fruit it will carry. In spring, blossoms cover the branches and bees move
from tree to tree. A late frost at blossom time can ruin a whole year. In autumn, pickers move
along the rows with ladders and baskets, and the fruit is stored in cool dark rooms. Some kinds
are eaten fresh, while others are pressed for juice or cider. Pruning in winter keeps the trees
open to light and air.

Caves form where water slowly dissolves soft rock such as limestone. Rain picks up a little acid
from the air and the soil, and as it trickles through cracks it widens them over ages. Some caves
hold underground rivers, and some hold lakes so clear that the bottom seems close enough to
touch. Where water drips from the ceiling, it leaves behind a trace of mineral. Over time these
traces grow into stone icicles that hang down, while matching columns rise from the floor below.
The air inside stays at nearly the same temperature all year. Bats roost in the high chambers and
fly out at dusk to hunt. Explorers carry several lights, because darkness underground is total
and a single failure can be serious.

A desert is defined by a lack of rain rather than by heat. Some deserts are burning hot by day,
while others are cold for much of the year. Plants there save every drop of water. Some store it
in thick stems, some have roots that reach far down, and some wait as seeds for years until a
rare storm arrives. After such a storm the ground can bloom with flowers almost overnight. Animals
rest in burrows or shade during the day and come out in the cool of the evening. Dunes move with
the wind, grain by grain, marching slowly across the land. Travelers once crossed deserts in long
caravans, moving from well to well. The silence at night under a clear sky is unlike anything
found in a town.

Roads remember the feet that made them. Many began as animal tracks that people followed because
they led to water or to easier ground. Later, builders laid stones and gravel so that carts
would not sink in the mud. A well built road has a curved surface to shed rain and ditches on
either side to carry it away. Milestones and signposts told travelers how far they had come.
Inns grew up at the places where a day of travel ended. Some old roads run straight for great
distances, showing the confidence of the people who surveyed them. Others wind around every
hill and marsh. Even when a road is abandoned, its line can often be seen from the air, faint in
the fields.

Stars are distant suns, so far away that their light takes years to reach us. On a dark night,
far from towns, thousands can be seen with the naked eye, and the pale band of the galaxy
stretches across the sky. Stars differ in color as well as brightness. Blue stars are hotter than
yellow ones, and red stars are cooler still. The patterns that people named long ago are only
chance alignments seen from our particular place. As the earth moves around the sun, different
stars rise in different seasons, and farmers once used them as a calendar. Sailors steered by
them. A single steady star above the north has guided travelers for a very long time.

Songbirds learn their songs much as children learn to speak. A young bird listens to the adults
around it, practices quiet rambling versions, and slowly shapes them into the proper song of its
kind. In some species each region has its own dialect, and a bird from far away sounds slightly
foreign. Songs announce that a territory is taken and that a singer is healthy and ready to
nest. The loudest chorus comes at dawn, when the air is still and sound carries well. Birds that
live in dense forest tend to sing lower notes that travel through leaves, while birds of open
country often sing higher and faster. Listening closely for a few mornings is enough to start
recognizing the regular singers of a garden hedge.

Pottery is shaped from clay, which is soft when wet and hard as stone once fired. A potter wedges
the clay first, pressing out air bubbles that would burst in the kiln. On the wheel, the lump is
centered with steady pressure, opened with the thumbs, and drawn upward into walls. Handles and
spouts are added when the piece has dried to a leather hardness. The first firing turns clay into
a porous ceramic. A glaze of powdered minerals is then brushed or poured on, and the second
firing melts it into a smooth glassy coat. Colors change in the heat in ways that are hard to
predict, which is part of the pleasure. Broken pots last for thousands of years and tell us much
about the people who used them.

A lake looks calm from its shore, but it turns over twice a year. In summer the sun warms the top
layer, which floats on colder and heavier water below. The two layers barely mix, and the deep
water slowly loses its oxygen. In autumn the surface cools until it is as heavy as the depths,
and wind stirs the whole lake from top to bottom. Water is heaviest a little above freezing, so in
winter the coldest water rises and ice forms on top, sheltering the life beneath. Fish gather in
the deeper places and move slowly until spring. Reeds and lilies grow along the edges, where the
water is shallow and warm. A still lake at sunrise reflects the hills so perfectly that it seems
to hold a second sky.

Fog is a cloud that has come down to walk on the ground. It forms when moist air cools until it
cannot hold all of its water vapor, and the extra water condenses into droplets too small to
fall. On clear nights the ground loses heat quickly, and the air just above it can cool enough to
form fog in valleys and hollows. Along some coasts, warm sea air drifts over cold water and
becomes a thick gray bank that rolls inland. Sound behaves strangely in fog, seeming both close
and far away. Drivers slow down and ships sound their horns. When the morning sun warms the
ground, the fog thins from below, and trees and rooftops appear again one by one as if they were
being drawn.

Snow is made of crystals that grow around specks of dust in cold clouds. Each crystal has six
arms because of the way water molecules fit together when they freeze. The exact shape depends
on the temperature and moisture of the air through which the crystal falls, so that no two follow
quite the same path. Fresh snow is mostly air, which is why it muffles sound and keeps the ground
beneath it from freezing deeply. Over the winter the lower layers are pressed and changed until
they become dense and grainy. On steep slopes a weak layer can give way and send the whole pack
sliding downhill. In spring, the melting snow feeds the streams that fill the rivers all summer.

Cheese is a way of keeping milk long after the cow has been milked. The milk is warmed and a
culture is added to sour it slightly. Then rennet makes it set into a soft curd, which is cut to
let the whey run out. The smaller the pieces, the drier and harder the finished cheese will be.
The curds are salted, pressed into molds and left to age in cool cellars. During aging, bacteria
and molds slowly change the texture and flavor. Some cheeses are ready in a few weeks, while
others are kept for years and grow sharp and crumbly. Cheesemakers turn and brush the wheels by
hand and judge them by smell and by tapping. Every valley once had its own recipe.

Tea comes from the young leaves of a shrub that grows best on misty hillsides. Pickers take only
the top two leaves and the bud, moving quickly along the rows. What happens next decides the kind
of tea. Leaves that are dried at once stay green and fresh in flavor. Leaves that are rolled and
left to darken in the air become the black tea common in many kitchens. Between those two lie
many careful stages. Water that is too hot can make delicate leaves bitter, and water that is too
cool draws out little flavor. In some places tea is a quick drink taken standing, and in others it
is a ceremony with strict steps. Either way, the kettle is usually the first thing put on in the
morning.

A garden teaches patience by refusing to hurry. Seeds sown in cold soil simply wait, and seedlings
set out too early may be lost to a single frost. The soil itself is alive, full of worms, roots
and tiny creatures that turn dead leaves into dark crumbly earth. Compost heaps speed that work
along. Weeds are only plants growing where someone does not want them, and many of them are
tougher than the flowers they crowd. Watering in the evening lets the ground drink before the sun
returns. By midsummer, a well tended plot can feed a household with beans, greens and berries.
In autumn the gardener cuts back, covers the beds and begins to plan for a better year.

Letters crossed oceans long before telephones and took weeks or months to arrive. People wrote
carefully, knowing that the news would be old by the time it was read. Replies were answers to
questions that might no longer matter. Postal services grew from messengers on horseback to
networks of coaches, ships and trains. Stamps were introduced so that the sender rather than the
receiver paid, which made letters cheaper and far more common. Families separated by emigration
kept in touch through bundles of letters tied with string. Historians treasure such bundles,
because ordinary people recorded in them what official papers ignored. Even a short note about
the weather can bring a distant afternoon back to life.

Copper was one of the first metals that people learned to use. It can be found in pure lumps, and
it is soft enough to hammer into shape without heat. Later, smiths learned to melt it from ore in
hot fires and pour it into molds. Mixed with a little tin, it became bronze, which is harder and
holds an edge. Copper carries heat and electricity very well, which is why it lines cooking pots
and runs through the walls of houses as wire. Left outside, it slowly turns from a bright reddish
color to brown and finally to a soft green coat that protects the metal underneath. Old roofs and
statues show that green from far away.

A kite climbs by leaning against the wind. Its surface is tilted so that the moving air pushes it
up and back, while the string holds it from drifting away. The tail keeps it pointed steadily
into the wind instead of spinning. On a gusty day a kite dives and climbs, and the flier must let
out or pull in the line to keep it aloft. Kites were used long ago to lift lines across rivers, to
carry signals and to measure the weather high above the ground. Some were large enough to lift a
person. Most kites, though, are flown simply for the joy of feeling the wind through a thin taut
string and watching a bright shape hang against the clouds.
"""

ESSAYS: tuple[str, ...] = tuple(" ".join(p.split()) for p in TEXT.strip().split("\n\n"))

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(essay: str) -> list[str]:
    """The sentences of one essay (split after ``.``, ``!`` or ``?`` followed by a space)."""
    return _SENTENCE_END.split(essay)

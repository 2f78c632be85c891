-- Every request for a tracked link. `is_prefetch`: a link preview or scanner fetched it, not
-- a person: a HEAD request (a browser asks with GET), or a user agent of
-- var('link_preview_agents') (macros/clicks.sql). A GET without a user agent is a person.

with

source as (

    select * from {{ source('ops', 'clicks') }}

),

renamed as (

    select
        click_id,
        token as link_token,
        message_id,
        cast(clicked_at as timestamp) as clicked_at,
        user_agent,
        -- rows from before the store recorded the method were all GETs
        coalesce(upper(method), 'GET') as method

    from source

),

final as (

    select
        *,
        method = 'HEAD' or {{ is_link_preview_agent('user_agent') }} as is_prefetch
    from renamed

)

select * from final
